"""``tune --resume`` continues the study as it was set up: settings left at their defaults come from the
study, a different value is refused by name, and one output folder holds one study."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import typer
from optuna.storages.journal import JournalFileBackend, JournalStorage

from autotune.config import TuneConfig
from autotune.resume import default_study_name, settings_for_resume
from autotune.study import claim_output_dir
from probes.result import ProbeResult
from recipes.errors import BadInput
from recipes.records import CONFIG_KEY
from tests.probe_fakes import probe_machine


@pytest.fixture(scope="module")
def h100(tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    return probe_machine("h100_sxm_1x", tmp_path_factory.mktemp("m"))


def _study(out: Path, cfg: TuneConfig, probe: ProbeResult) -> str:
    out.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    name = default_study_name(cfg, probe)
    optuna.create_study(study_name=name, storage=storage).set_user_attr(CONFIG_KEY, cfg.to_dict())
    return name


def test_settings_left_at_their_defaults_come_from_the_study(h100: ProbeResult, tmp_path: Path) -> None:
    first = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, prompt="a blue whale", seed=7,
                       quality="lossy_psnr=22", out_dir=str(tmp_path), trials=4)
    _study(tmp_path, first, h100)
    again = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, out_dir=str(tmp_path), trials=9, resume=True)
    cfg, notes = settings_for_resume(again, h100)
    assert (cfg.prompt, cfg.seed, cfg.quality, cfg.trials) == ("a blue whale", 7, "lossy_psnr=22", 9)
    assert any("the study's own" in n and "prompt='a blue whale'" in n for n in notes)


@pytest.mark.parametrize("change, flag", [({"quality": "lossy_psnr=60"}, "--quality"),
                                          ({"objective": "pareto"}, "--objective"),
                                          ({"prompt": "a red fox"}, "--prompt")])
def test_a_setting_given_another_value_is_refused_by_name(h100: ProbeResult, tmp_path: Path, change: dict,
                                                          flag: str) -> None:
    first = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, prompt="a blue whale", out_dir=str(tmp_path))
    _study(tmp_path, first, h100)
    with pytest.raises(BadInput, match=f"{flag} .* differs from study") as err:
        settings_for_resume(dataclasses.replace(first, resume=True, **change), h100)
    assert "--study NEW_NAME" in err.value.hint


def test_a_resume_that_names_no_study_while_others_are_there_says_which(h100: ProbeResult, tmp_path: Path) -> None:
    name = _study(tmp_path, TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, out_dir=str(tmp_path)), h100)
    other_frames = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=33, out_dir=str(tmp_path), resume=True)
    with pytest.raises(BadInput, match="it holds: " + name) as err:
        settings_for_resume(other_frames, h100)
    assert f"--study {name}" in err.value.hint
    fresh = TuneConfig(model="random", ladder="off", task="ti2v-5B", out_dir=str(tmp_path / "new"), resume=True)
    assert settings_for_resume(fresh, h100) == (fresh, [])  # nothing there yet: --resume starts it


def test_one_output_folder_holds_one_study(tmp_path: Path) -> None:
    claim_output_dir(tmp_path, "A")
    claim_output_dir(tmp_path, "A")  # the same study again: resume, report
    with pytest.raises(BadInput, match="holds the outputs of study 'A'"):
        claim_output_dir(tmp_path, "B")


def test_typing_the_workload_the_study_resolved_to_is_the_same_study(h100: ProbeResult, tmp_path: Path) -> None:
    first = TuneConfig(model="random", ladder="off", task="ti2v-5B", out_dir=str(tmp_path))  # size/frames/steps: defaults
    _study(tmp_path, first, h100)
    r = first.base_recipe().resolved()
    spelled = dataclasses.replace(first, resume=True, size=r.size, frames=r.frames, steps=r.steps)
    cfg, _ = settings_for_resume(spelled, h100)  # not refused as "--size '1280*704' differs ... ''"
    assert default_study_name(cfg, h100) == default_study_name(first, h100)


def test_a_study_whose_creator_died_before_its_setup_can_be_resumed(h100: ProbeResult, tmp_path: Path) -> None:
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", out_dir=str(tmp_path), resume=True)
    tmp_path.mkdir(exist_ok=True)
    optuna.create_study(study_name=default_study_name(cfg, h100),
                        storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))))
    assert settings_for_resume(cfg, h100) == (cfg, [])  # not "no study X ... it holds: X"


def test_a_folder_with_someone_elses_tune_files_is_not_claimed(tmp_path: Path) -> None:
    """No study marker, but a launch.sh and report.md of the user's: a tune there would replace them."""
    (tmp_path / "launch.sh").write_text("#!/bin/sh\necho mine\n")
    (tmp_path / "report.md").write_text("my notes\n")
    (tmp_path / "study.journal").write_text("")  # the tune's own journal may already be there
    with pytest.raises(BadInput, match="launch.sh, report.md that no wanctl study wrote"):
        claim_output_dir(tmp_path, "A")
    assert (tmp_path / "launch.sh").read_text().endswith("echo mine\n") and not (tmp_path / ".wanctl-study").exists()
    (tmp_path / "fresh").mkdir()
    claim_output_dir(tmp_path / "fresh", "A")  # an empty folder is claimed
    assert (tmp_path / "fresh" / ".wanctl-study").read_text().strip() == "A"


def test_two_studies_claiming_one_new_folder_at_once_one_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both read "no marker"; the other study writes its marker before this one does: this one must not
    replace it (the check-then-write claim let both go on and share trials/ and the baseline)."""
    import autotune.study as study_mod

    real = study_mod._study_holding
    calls = []

    def read_then_lose_the_race(marker: Path) -> str:
        calls.append(marker)
        if len(calls) == 1:  # this tuner's read, then the other tuner's claim lands
            marker.write_text("B\n")
            return ""
        return real(marker)

    monkeypatch.setattr(study_mod, "_study_holding", read_then_lose_the_race)
    with pytest.raises(BadInput, match="just claimed by study 'B'"):
        claim_output_dir(tmp_path, "A")
    assert (tmp_path / ".wanctl-study").read_text() == "B\n"
    assert [p.name for p in tmp_path.iterdir()] == [".wanctl-study"]  # no temp file left behind


def test_concurrent_claims_of_one_folder_leave_exactly_one_study(tmp_path: Path) -> None:
    import threading

    names = [f"S{i}" for i in range(8)]
    won: list[str] = []
    start = threading.Barrier(len(names))

    def claim(name: str) -> None:
        start.wait()
        try:
            claim_output_dir(tmp_path, name)
            won.append(name)
        except BadInput:
            pass

    threads = [threading.Thread(target=claim, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and (tmp_path / ".wanctl-study").read_text().strip() == won[0]


def test_a_proxy_no_recipe_takes_is_refused_before_the_baseline() -> None:
    """The proxy is first used after the baseline and a first trial: '832x480' (an x) and 16 frames were
    accepted, then failed the study as 'the baseline's short reference run failed'."""
    from autotune.config import TuneConfig

    with pytest.raises(BadInput, match="--proxy-size: recipe field 'size' = '832x480'"):
        TuneConfig(model="random", ladder="off", task="t2v-A14B", proxy_size="832x480")
    with pytest.raises(BadInput, match="--proxy-frames: .* 4n\\+1") as err:
        TuneConfig(model="random", ladder="off", task="t2v-A14B", proxy_frames=16)
    assert "--proxy-frames" in err.value.hint
    TuneConfig(model="random", ladder="off", task="t2v-A14B", proxy_size="832*480", proxy_frames=17)
    TuneConfig(model="tiny", proxy_size="832x480")  # tiny measures speed and quality in one full run: unused


def test_a_flag_given_at_its_default_value_is_the_users_not_the_studys(h100: ProbeResult, tmp_path: Path) -> None:
    """`--objective latency --seed 42` on a pareto study seeded 7 was resumed as pareto/7 with a note."""
    first = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, objective="pareto", seed=7, out_dir=str(tmp_path))
    _study(tmp_path, first, h100)
    again = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, out_dir=str(tmp_path), resume=True)
    assert settings_for_resume(again, h100)[0].objective == "pareto"  # not typed: the study's
    with pytest.raises(BadInput, match="--objective 'latency' differs from study"):
        settings_for_resume(again, h100, given=frozenset({"objective"}))


def test_lightning_none_is_not_a_host_path(h100: ProbeResult, tmp_path: Path) -> None:
    """'none' (Lightning not searched) against a study that searched a LoRA folder changes the space."""
    lora = tmp_path / "lora"
    lora.mkdir()
    first = TuneConfig(model="random", ladder="off", task="t2v-A14B", lightning_lora=str(lora), out_dir=str(tmp_path))
    _study(tmp_path, first, h100)
    with pytest.raises(BadInput, match="--lightning-lora 'none' differs from study"):
        settings_for_resume(dataclasses.replace(first, resume=True, lightning_lora="none"), h100)
    other_host = str(tmp_path / "mounted-elsewhere")
    cfg, notes = settings_for_resume(dataclasses.replace(first, resume=True, lightning_lora=other_host), h100)
    assert any("on this host" in n for n in notes)


def test_the_cli_tells_which_options_were_typed() -> None:
    from typer.testing import CliRunner

    from commands.tune import _given

    app = typer.Typer()
    seen: list[frozenset[str]] = []

    @app.command()
    def t(ctx: typer.Context, objective: str = typer.Option("latency", "--objective"),
          seed: int = typer.Option(42, "--seed"), output: str = typer.Option("x", "--out")) -> None:
        seen.append(_given(ctx))

    assert CliRunner().invoke(app, ["--objective", "latency", "--out", "y"]).exit_code == 0
    assert seen == [frozenset({"objective", "out_dir"})]  # --seed left at its default: not given
