"""wanctl's commands, one module each; ``cli.py`` registers them and maps errors to exit codes.

A command module holds the command's body only: it parses and checks its options, calls a use case, and renders
what comes back (data to stdout through ``console.out`` or ``console.print_json``, everything else to stderr
through ``console.err``). The use cases live in modules named for what they do: ``run_recipe`` (make a video
with one recipe), ``outputs`` (a study's recipe, launch script, report and store copy), ``inputs`` (command-line
values over a recipe, named files looked up), ``probing``; ``options`` holds the options several commands take,
``signals`` what Ctrl-C, SIGTERM and SIGHUP do.

Adding a command ``wanctl NAME`` is one new file and one line:

1. ``commands/NAME.py`` with a function ``NAME(...) -> None`` whose docstring is its ``--help`` line. It takes
   ``json_out: JsonOpt = False`` and ``debug: DebugOpt = False`` like every command, calls
   ``console.setup_logging(debug)`` first, and imports heavy packages (autotune, downloads, probes, reports)
   inside the function, as the others do, so ``wanctl --help`` stays quick. Never torch or wan_runtime: the
   runtime runs as its own process (tests/test_layering.py checks this package). Expected failures are raised
   as ``recipes.errors`` exceptions (``BadInput`` ...), never caught and printed here: ``cli.main`` gives each
   its exit code and one clean message.
2. In ``cli.py``: ``app.command()(NAME.NAME)`` beside the others (the order there is ``--help``'s), and NAME
   added to its ``from commands import ...`` line.

tests/test_cli_promises.py then asks for one cheap bad-input command line for it in ``BAD_INPUT``.
"""
