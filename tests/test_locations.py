"""What a wan_runtime child process is started with."""

from __future__ import annotations


def test_children_get_the_checkout_on_pythonpath_but_never_site_packages(tmp_path, monkeypatch) -> None:
    """An installed wanctl's parent folder is site-packages: on PYTHONPATH it would shadow the stdlib."""
    import recipes.locations as ce

    monkeypatch.setenv("PYTHONPATH", "/extra")
    assert ce.with_source_on_path()["PYTHONPATH"] == f"{ce.source_root()}:/extra"  # this checkout
    installed = tmp_path / "site-packages"
    (installed / "recipes").mkdir(parents=True)
    monkeypatch.setattr(ce, "source_root", lambda: installed)
    assert ce.with_source_on_path()["PYTHONPATH"] == "/extra"
