"""Options several commands take, defined once (``Annotated`` aliases): a command names them in its signature.

Every command takes ``JsonOpt`` and ``DebugOpt`` (tests/test_cli_promises.py holds each one to it).
"""

from __future__ import annotations

from typing import Annotated

import typer

from recipes.models import MODELS

ModelOpt = Annotated[str, typer.Option("--model", help="tiny (embedded), random (full-size random weights) or a checkpoint dir")]
TaskOpt = Annotated[str, typer.Option("--task", help=f"one of {', '.join(MODELS)}")]
SizeOpt = Annotated[str, typer.Option("--size", help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's)")]
# An option whose default is decided later (0 or empty: the task's) says so in its help, never "[default: 0]".
FramesOpt = Annotated[int, typer.Option("--frames", help="4n+1 frames (default: the task's)", show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="denoising steps (default: the task's)", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="text prompt")]
NegOpt = Annotated[str, typer.Option("--negative-prompt", help="negative prompt")]
ImageOpt = Annotated[str, typer.Option("--image", help="conditioning image (i2v-A14B; optional for ti2v-5B)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON to stdout instead of tables")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace the output file if it exists")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="load a checkpoint dir that wanctl download did not verify")]
