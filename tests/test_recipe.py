from __future__ import annotations

import pytest

from recipes.catalogue import ATTENTION_BACKENDS, RING_ATTENTION
from recipes.errors import RecipeError, SchemaError
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe, validate
from recipes.serialize import RecipeMeta, dumps_recipe, loads_recipe, read_recipe, write_recipe


def test_defaults_are_plain_diffusers_and_valid() -> None:
    r = Recipe.for_task("t2v-A14B", model="random")
    assert (r.size, r.frames, r.steps, r.guidance, r.guidance_2) == ("1280*720", 81, 40, 4.0, 3.0)
    assert (r.attention, r.quant, r.compile, r.cache, r.offload) == ("native", "none", "off", "none", "none")
    validate(r)
    assert Recipe.for_task("ti2v-5B", model="random").size == "1280*704"


@pytest.mark.parametrize("changes, field, fragment", [
    ({"frames": 80}, "frames", "4n+1"),
    ({"model": "random", "size": "1000*1000"}, "size", "1280*720"),
    ({"model": "random", "ulysses": 3, "gpus": 3}, "ulysses", "divisor of the 40"),
    ({"ulysses": 4, "gpus": 2}, "gpus", "ulysses x ring x cfg-parallel = 4"),
    ({"ulysses": 2, "gpus": 4}, "gpus", "ulysses x ring x cfg-parallel = 2"),
    ({"ulysses": 2, "ring": 2, "gpus": 8}, "gpus", "ulysses x ring x cfg-parallel = 4"),
    ({"ring": 2, "gpus": 2}, "attention", "with ring > 1 (diffusers rings only these"),
    ({"ring": 2, "gpus": 2, "attention": "_flash_3"}, "attention", "_native_cudnn, _native_flash, flash, sage"),
    ({"ring": 2, "ulysses": 2, "gpus": 4, "attention": "fa3_fp8"}, "attention", "log-sum-exp"),
    ({"ring": 2, "cfg_parallel": True, "gpus": 2, "attention": "_native_cudnn"}, "gpus", "= 4"),
    ({"fsdp": True, "cfg_parallel": True, "gpus": 2}, "fsdp", "FSDP shards within a CFG group"),
    ({"fsdp": True, "gpus": 2, "quant": "int8wo"}, "quant", "Int8Tensor implements neither aten.split"),
    ({"fsdp": True, "gpus": 2, "cache": "seacache"}, "cache", "_is_parameter_sharded"),
    ({"ulysses": 2, "gpus": 2, "compile": "full"}, "compile", "parallel exchanges"),
    ({"quant": "te_delayed", "compile": "full"}, "compile", "Transformer Engine"),
    ({"quant": "te_current", "compile": "regional"}, "compile_fullgraph", "dynamo.disable"),
    ({"guidance": float("nan")}, "guidance", "1..50 (0 for the model card's value)"),
    ({"guidance": 0.5}, "guidance", "1..50"),
    ({"task": "ti2v-5B", "guidance_2": 3.0}, "guidance_2", "no low-noise expert"),
    ({"frames": -3}, "frames", "4n+1"),
    ({"attention": "fa3"}, "attention", "_flash_3"),
    ({"task": "i2v-A14B"}, "image", "needs a conditioning image"),
    ({"cfg_parallel": True}, "cfg_parallel", "two GPU groups"),
    ({"lightning": 4, "cache": "magcache"}, "cache", "Lightning"),
])
def test_validation_names_field_and_allowed(changes: dict, field: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as ei:
        validate(Recipe(**changes))
    assert ei.value.field == field
    assert fragment in str(ei.value)
    assert ei.value.exit_code == 2


def test_toml_round_trip_is_exact(tmp_path) -> None:
    r = Recipe(prompt='she said "hi" $(id) `x`\nnew line \'q\' ünï', attention="_native_cudnn", tf32=True,
               cache="magcache", cache_threshold=0.24, magcache_k=2, cache_retention=0.1)
    meta = RecipeMeta(name="tiny_cpu_abcd1234", speedup=1.7, notes=["adapted: x"], versions={"torch": "2.13"})
    p = write_recipe(tmp_path / "recipe.toml", r, meta)
    r2, meta2 = read_recipe(p)
    assert r2 == r and meta2 == meta


def test_unknown_key_and_newer_schema_are_errors() -> None:
    text = dumps_recipe(Recipe())
    with pytest.raises(SchemaError, match="unknown key"):
        loads_recipe(text.replace("[recipe]", "[recipe]\natention = \"native\""))
    with pytest.raises(SchemaError, match="newer"):
        loads_recipe(text.replace("schema_version = 1", "schema_version = 99"))
    with pytest.raises(SchemaError, match="must be an integer"):
        loads_recipe(text.replace("frames = 0", 'frames = "81"'))


def test_hash_ignores_content_but_not_knobs() -> None:
    a = Recipe(prompt="a cat", seed=1)
    assert a.recipe_hash() == Recipe(prompt="a dog", seed=2).recipe_hash()
    assert a.recipe_hash() != Recipe(attention="_native_cudnn").recipe_hash()
    # Resolution makes "default" and "explicit default" the same recipe.
    assert Recipe(model="random").recipe_hash() == Recipe(model="random", size="1280*720", frames=81).recipe_hash()


def test_a_field_added_at_its_default_leaves_every_hash_as_it_was() -> None:
    """Stored studies and folders are named by these hashes: pinned, so a new field (whose default is the
    behaviour before it) cannot rename them. Changing a pin means every user's study starts over."""
    assert Recipe().recipe_hash() == "b0bd05be3d0426c0"
    assert Recipe(model="random", attention="_flash_3", compile="regional").recipe_hash() == "f0ce1b3111d70492"


def test_overrides_parse_types_and_reject_unknown() -> None:
    r = apply_overrides(Recipe(), ["tf32=true", "cache_threshold=0.2", "magcache_k=3", "attention=_native_math"])
    assert (r.tf32, r.cache_threshold, r.magcache_k, r.attention) == (True, 0.2, 3, "_native_math")
    with pytest.raises(Exception, match="unknown recipe field"):
        apply_overrides(Recipe(), ["nope=1"])
    with pytest.raises(Exception, match="needs an integer"):
        apply_overrides(Recipe(), ["frames=many"])


def test_lossy_knobs_and_stack_label() -> None:
    r = Recipe(cache="fbcache", attention="sage", compile="regional")
    assert r.lossy_knobs() == ["cache=fbcache", "attention=sage"]
    assert "compile=regional" in r.stack_label() and Recipe().stack_label() == "baseline"


def test_one_strict_loader_for_every_document() -> None:
    """Nested documents (a result with its timings, a spec with its recipe) get the same checks as a recipe."""
    import json

    from recipes.spec import RunResult, TrialSpec

    good = json.loads(RunResult().to_json())
    good["timings"]["step_s"] = [1, 2.5]  # JSON integers where floats are expected are fine
    assert RunResult.from_json(json.dumps(good)).timings.step_s == [1.0, 2.5]
    bad = json.loads(RunResult().to_json())
    bad["timings"]["turbo"] = 1
    with pytest.raises(SchemaError, match=r"result.timings: unknown key\(s\) turbo in Timings"):
        RunResult.from_json(json.dumps(bad))
    spec = json.loads(TrialSpec().to_json())
    spec["recipe"]["frames"] = "81"
    with pytest.raises(SchemaError, match=r"spec.recipe.frames: expected int, got '81' \('frames' must be an integer\)"):
        TrialSpec.from_json(json.dumps(spec))


def test_the_parallel_layouts_a_run_can_take_are_valid() -> None:
    # Ulysses alone, CFG alone, both on 4, and FSDP alone or inside a Ulysses group; ring alone, under Ulysses,
    # with CFG and with FSDP.
    for kw in ({"ulysses": 2, "gpus": 2}, {"cfg_parallel": True, "gpus": 2}, {"ulysses": 2, "cfg_parallel": True, "gpus": 4},
               {"fsdp": True, "gpus": 2}, {"ulysses": 2, "fsdp": True, "gpus": 2, "attention": "_native_cudnn"},
               {"ulysses": 2, "cfg_parallel": True, "fsdp": True, "gpus": 4, "compile": "regional"},
               {"ring": 2, "gpus": 2, "attention": "_native_flash"},
               {"ulysses": 2, "ring": 2, "gpus": 4, "attention": "_native_cudnn"},
               {"ring": 2, "cfg_parallel": True, "fsdp": True, "gpus": 4, "attention": "torch_fa4"}):
        validate(Recipe(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("attention", ATTENTION_BACKENDS)
def test_ulysses_takes_every_attention_and_ring_only_what_diffusers_can_ring(attention: str) -> None:
    """Ulysses runs around any kernel (diffusers' all-to-all, or wanctl's where diffusers has no parallel path:
    FA3, fa3_fp8, math, efficient, flex); a ring merges partial results by their log-sum-exp, which only the
    kernels of diffusers' ring return."""
    assert validate(Recipe(ulysses=2, gpus=2, attention=attention)).attention == attention
    assert validate(Recipe(ulysses=2, cfg_parallel=True, fsdp=True, gpus=4, attention=attention))
    ring = Recipe(ulysses=2, ring=2, gpus=4, attention=attention)
    if attention in RING_ATTENTION:
        validate(ring)
        return
    with pytest.raises(RecipeError) as err:
        validate(ring)
    assert (err.value.field, err.value.value) == ("attention", attention)
    assert "ring 1 (Ulysses runs every kernel)" in err.value.hint


def test_ring_splits_the_sequence_where_ulysses_cannot_split_the_heads() -> None:
    """The tiny model has 4 heads: 8 ranks are ulysses 4 x ring 2 or pure ring, never ulysses 8. A14B's 40 heads
    on 16 ranks: ulysses 8 x ring 2. The sequence must still divide over every rank of a group."""
    with pytest.raises(RecipeError, match="a divisor of the 4 attention heads") as err:
        validate(Recipe(ulysses=8, gpus=8, attention="_native_cudnn"))
    assert "ring degree" in err.value.hint
    validate(Recipe(ulysses=4, ring=2, gpus=8, attention="_native_cudnn", size="64*64"))  # 48 tokens
    validate(Recipe(ring=4, gpus=4, attention="_native_flash"))  # 36 tokens, no head split at all
    validate(Recipe(task="t2v-A14B", model="random", gpus=16, ulysses=8, ring=2, attention="_native_cudnn"))
    with pytest.raises(RecipeError) as err:  # 36 tokens over 8 ranks
        validate(Recipe(ulysses=4, ring=2, gpus=8, attention="_native_cudnn"))
    assert (err.value.field, err.value.value) == ("ring", 2)
    assert "product with ulysses 4 divides the 36-token sequence of 64*48 x 9 frames" in str(err.value)
    assert err.value.hint.startswith("ulysses x ring may be 2, 3, 4, 6, 9, 12, 18, 36 here")
    with pytest.raises(RecipeError, match="ulysses x ring 1"):
        validate(Recipe(cfg_parallel=True, fsdp=True, gpus=2))


@pytest.mark.parametrize("layout", [{"ulysses": 2, "gpus": 2}, {"cfg_parallel": True, "gpus": 2},
                                    {"ulysses": 2, "cfg_parallel": True, "fsdp": True, "gpus": 4},
                                    {"fsdp": True, "gpus": 2}])
def test_caches_run_on_several_gpus_but_seacache_not_under_fsdp(layout: dict) -> None:
    """Each rank's skip decision is agreed with its CFG group (wan_runtime/knobs/cache_lockstep.py); diffusers'
    SeaCache alone skips nothing on FSDP-sharded blocks."""
    for cache in ("magcache", "fbcache", "taylorseer", "seacache"):
        r = Recipe(cache=cache, **layout)
        if cache == "seacache" and r.fsdp:
            with pytest.raises(RecipeError, match="fails open"):
                validate(r)
        else:
            validate(r)


def test_fp8_quant_shards_under_fsdp_and_int8_weight_only_does_not() -> None:
    for quant in ("fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block"):
        validate(Recipe(quant=quant, fsdp=True, gpus=2))
        validate(Recipe(quant=quant, ulysses=2, cfg_parallel=True, fsdp=True, gpus=4))
    with pytest.raises(RecipeError) as e:
        validate(Recipe(quant="int8wo", fsdp=True, gpus=2))
    assert e.value.field == "quant" and "torchao 0.18" in str(e.value)
    assert "fp8_rowwise" in (e.value.hint or "") and "int8wo" not in (e.value.hint or "")


@pytest.mark.parametrize("model, revision, ok", [
    ("/ckpt", "0123456789abcdef0123456789abcdef01234567", True),
    ("/ckpt", "", True),
    ("/ckpt", "main", False),
    ("/ckpt", "0123456789ABCDEF0123456789ABCDEF01234567", False),
    ("/ckpt", "0123456789abcdef", False),
    ("tiny", "0123456789abcdef0123456789abcdef01234567", False),
])
def test_model_revision_is_a_full_sha_and_only_for_checkpoints(model: str, revision: str, ok: bool) -> None:
    r = Recipe(model=model, model_revision=revision)
    if ok:
        assert validate(r) == r
        return
    with pytest.raises(RecipeError) as err:
        validate(r)
    assert err.value.field == "model_revision"


@pytest.mark.parametrize("version, fragment", [('"1"', "not a schema number"), ("99", "newer than this wanctl"),
                                               ("true", "not a schema number"), ("0", "not a schema number")])
def test_every_saved_document_checks_its_schema_version_the_same_way(version: str, fragment: str) -> None:
    """Recipe, probe, trial spec and result: a string, a boolean or a newer version is a SchemaError (exit 2),
    never a TypeError or a silently misread file."""
    from probes.result import ProbeResult
    from recipes.errors import SchemaError
    from recipes.spec import RunResult, TrialSpec

    docs = {
        "recipe": lambda: loads_recipe(f"schema_version = {version}\n[recipe]\n", where="r.toml"),
        "probe": lambda: ProbeResult.from_json(f'{{"schema_version": {version}}}'),
        "spec": lambda: TrialSpec.from_json(f'{{"schema_version": {version}}}'),
        "result": lambda: RunResult.from_json(f'{{"schema_version": {version}, "outcome": "ok"}}'),
    }
    for name, load in docs.items():
        with pytest.raises(SchemaError, match=fragment):
            load()
            pytest.fail(f"{name} accepted schema_version {version}")


def test_ulysses_must_divide_the_token_count_and_the_tiny_models_heads() -> None:
    """Found at validation, not by a runtime error after torchrun and a model load (exit 3)."""
    from recipes.recipe import validate

    with pytest.raises(RecipeError, match="a divisor of the 59136-token sequence of 1024\\*704 x 81 frames"):
        validate(Recipe(task="t2v-A14B", model="random", size="1024*704", frames=81, gpus=5, ulysses=5))
    validate(Recipe(task="t2v-A14B", model="random", size="1280*720", frames=81, gpus=8, ulysses=8))  # 75,600 tokens
    with pytest.raises(RecipeError, match="a divisor of the 4 attention heads"):
        validate(Recipe(model="tiny", gpus=8, ulysses=8))  # A14B's 40 heads would take 8; tiny has 4
    with pytest.raises(RecipeError, match="45-token sequence") as err:
        validate(Recipe(model="tiny", size="80*48", gpus=2, ulysses=2))
    assert "another size or frame count" in err.value.hint


def test_cfg_parallel_needs_guidance_above_one() -> None:
    """diffusers skips CFG for any guidance <= 1: a CFG group would read a pass nobody computed (NaN)."""
    from recipes.recipe import validate

    with pytest.raises(RecipeError, match="guidance <= 1") as err:
        validate(Recipe(model="tiny", gpus=2, cfg_parallel=True, guidance=1.0))
    assert "drop cfg_parallel" in err.value.hint  # (a scale below 1 is refused as guidance itself: it runs as 1)
    validate(Recipe(model="tiny", gpus=2, cfg_parallel=True))  # the task's default guidance (> 1)


def test_a_prompt_that_is_not_utf8_is_bad_input() -> None:
    """`--prompt $'caf\\xe9'` in a UTF-8 locale reaches Python as a surrogate: refused at validation (exit 2),
    not a tokenizer crash after the model load."""
    from recipes.recipe import validate

    with pytest.raises(RecipeError, match="UTF-8 text") as err:
        validate(Recipe(prompt=b"caf\xe9".decode("utf-8", "surrogateescape")))
    assert "LANG=C.UTF-8" in err.value.hint
    validate(Recipe(prompt="café 🦊"))
