"""Recipe loading: defaults, overrides, and one clear error for each kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitcli.errors import VitError
from vitcli.recipe import Recipe, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_sections(tmp_path):
    r = load_recipe(write(tmp_path, "train: {epochs: 2}\n"))
    assert isinstance(r, Recipe)
    assert r.name == "r"  # the file's stem
    assert r.train.epochs == 2.0 and r.train.steps is None
    assert r.optim.betas == [0.9, 0.999] and r.train.batch_size == 4096


def test_overrides_are_read_as_yaml(tmp_path):
    r = load_recipe(
        write(tmp_path, "train: {epochs: 2}\noptim: {lr: 0.1}\n"),
        ["optim.lr=3e-4", "data.crop_scale=[0.5, 1]", "model.img_size=[32, 48]", "train.ema_decay=0.99", "name=mine"],
    )
    assert r.optim.lr == pytest.approx(3e-4)
    assert r.data.crop_scale == [0.5, 1.0]
    assert r.model.img_size == [32, 48]
    assert r.train.ema_decay == 0.99
    assert r.name == "mine"


def test_int_promoted_to_float_but_not_the_reverse():
    assert recipe_from_dict({"train": {"epochs": 1}, "optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(VitError, match=r"'train.batch_size' has the wrong type: 2.5"):
        recipe_from_dict({"train": {"epochs": 1, "batch_size": 2.5}})


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("train: {epochs: 1}\noptim: {lrr: 0.1}\n", r"Unknown recipe key 'optim.lrr'. Did you mean: lr\?"),
        ("trian: {epochs: 1}\n", r"Unknown recipe key 'trian'. Did you mean: train\?"),
        ("train: {epochs: 1}\noptim: {lr: fast}\n", r"'optim.lr' has the wrong type: 'fast' \(str\); expected a number"),
        ("train: {epochs: 1}\noptim: {lr: -0.1}\n", r"'optim.lr' must be a positive number; got -0.1"),
        ("train: {epochs: 1, batch_size: 0}\n", r"'train.batch_size' must be > 0; got 0"),
        ("train: {epochs: 1}\noptim: {name: lars}\n", r"'optim.name' must be one of adamw, adam, sgd, lamb; got 'lars'"),
        ("train: {epochs: 1}\nmodel: {global_pool: mean}\n", r"'model.global_pool' must be one of token, avg"),
        ("train: {epochs: 1}\ndata: {hflip: 1.5}\n", r"'data.hflip' is a probability in \[0, 1\]; got 1.5"),
        ("train: {epochs: 1, steps: 10}\n", r"set exactly one of them"),
        ("train: {}\n", r"set exactly one of them"),
        ("train: {epochs: 1, batch_size: 64, micro_batch_size: 48}\n", r"must divide train.batch_size"),
        ("train: {epochs: 1}\nmodel: {class_token: false}\n", r"needs model.global_pool: avg"),
        ("train: {epochs: 1}\noptim: [1, 2]\n", r"'optim' must be a mapping"),
        ("- just\n- a list\n", r"must be a YAML mapping"),
        ("train: {epochs: 1\n", r"is not valid YAML at line \d+, column \d+"),
        ("train: {epochs: 1}\noptim: {betas: [0.9]}\n", r"'optim.betas' must be two numbers"),
    ],
)
def test_each_mistake_is_one_clear_error(tmp_path, text, pattern):
    with pytest.raises(VitError, match=pattern):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr", r"must look like section.key=value"),
        ("optimizer.lr=1", r"unknown section 'optimizer'. Did you mean: optim\?"),
        ("lr=1", r"must be section.field"),
        ("optim.lrate=1", r"Unknown recipe key 'optim.lrate'"),
        ("train.batch_size=-4", r"'train.batch_size' must be > 0; got -4"),
    ],
)
def test_bad_overrides(tmp_path, override, pattern):
    with pytest.raises(VitError, match=pattern):
        load_recipe(write(tmp_path, "train: {epochs: 1}\n"), [override])


# What a run directory's recipe.yaml held before objectives had sections (vitcli <= 0.x, issue 24): flat keys.
FLAT_OBJECTIVE = """objective: {name: %s, mask_ratio: %s, mpp_target: pixels, mpp_bits: 4, mpp_replace: [0.6, 0.2, 0.2],
            decoder_dim: 64, decoder_depth: 2, decoder_heads: 8, norm_pix_loss: false, fewshot: [5]}
train: {epochs: 1}
"""


def test_each_objective_has_its_section_and_nested_overrides_reach_it(tmp_path):
    r = load_recipe(write(tmp_path, "train: {epochs: 1}\nobjective: {name: mae, mae: {decoder_dim: 64}}\n"),
                    ["objective.mae.mask_ratio=0.6", "objective.distill.tau=3", "objective.mpp.target=downsized"])
    assert (r.objective.mae.decoder_dim, r.objective.mae.mask_ratio, r.objective.mae.decoder_depth) == (64, 0.6, 8)
    assert r.objective.distill.tau == 3.0 and r.objective.mpp.target == "downsized" and r.objective.mpp.mask_ratio == 0.5
    with pytest.raises(VitError, match=r"Unknown recipe key 'objective.mae.decoder_width'. Did you mean: .*decoder_dim"):
        load_recipe(write(tmp_path, "train: {epochs: 1}\n"), ["objective.mae.decoder_width=3"])
    with pytest.raises(VitError, match="'objective.distill.teacher' is needed for objective distill"):
        load_recipe(write(tmp_path, "train: {epochs: 1}\nobjective: {name: distill}\n"))
    again = write(tmp_path, r.to_yaml())
    assert load_recipe(again) == r  # the resolved layout a run directory keeps


@pytest.mark.parametrize("name, ratio", [("mae", 0.6), ("mpp", 0.4), ("supervised", "null")])
def test_earlier_flat_objective_keys_still_load_into_the_sections(tmp_path, name, ratio):
    r = load_recipe(write(tmp_path, FLAT_OBJECTIVE % (name, ratio)))
    mpp, mae = r.objective.mpp, r.objective.mae
    assert (mpp.target, mpp.bits, mpp.replace) == ("pixels", 4, [0.6, 0.2, 0.2]) and r.objective.fewshot == [5]
    assert (mae.decoder_dim, mae.decoder_depth, mae.decoder_heads, mae.norm_pix_loss) == (64, 2, 8, False)
    if name != "supervised":  # mask_ratio was the named objective's
        assert getattr(r.objective, name).mask_ratio == ratio
    # an override in the earlier flat form still works, even before the name it depends on
    flat = load_recipe(write(tmp_path, "train: {epochs: 1}\n"), ["objective.mask_ratio=0.3", "objective.name=mae",
                                                                  "objective.decoder_dim=16", "objective.decoder_heads=4"])
    assert (flat.objective.mae.mask_ratio, flat.objective.mae.decoder_dim, flat.objective.mpp.mask_ratio) == (0.3, 16, 0.5)
    with pytest.raises(VitError, match="belongs to an objective's section: write objective.mae.mask_ratio"):
        load_recipe(write(tmp_path, "train: {epochs: 1}\n"), ["objective.mask_ratio=0.3"])
    with pytest.raises(VitError, match="'objective.decoder_dim' and 'objective.mae.decoder_dim' say the same thing"):
        load_recipe(write(tmp_path, "train: {epochs: 1}\nobjective: {decoder_dim: 8, mae: {decoder_dim: 16}}\n"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(VitError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_save_round_trip(tmp_path):
    r = load_recipe(write(tmp_path, "train: {epochs: 3}\n"), ["optim.lr=0.25", "data.mean=[0.1,0.2,0.3]"])
    r.save(tmp_path / "saved.yaml")
    again = load_recipe(tmp_path / "saved.yaml")
    assert again == r


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_say_how_to_run(path):
    text = path.read_text()
    assert text.startswith("#"), "every recipe opens with a comment saying what it trains and how to run it"
    assert "vit " in text.split("\n\n")[0] or "vit " in text[:1500]
    r = load_recipe(path)
    assert r.name == path.stem


def test_paper_recipes_use_the_papers_hyperparameters():
    for name in ("vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_h14", "r50_vit_b16"):
        r = load_recipe(RECIPES / f"{name}.yaml")
        assert r.train.batch_size == 4096
        assert r.optim.betas == [0.9, 0.999] and r.optim.clip_grad_norm == 1.0
        assert r.schedule.warmup_steps == 10_000 and r.schedule.decay in ("linear", "cosine")
        assert r.train.batch_size % r.train.micro_batch_size == 0
        expected_wd = {"imagenet-1k": 0.3, "imagenet-21k": 0.03}[r.data.dataset]
        assert r.optim.weight_decay == expected_wd


def test_deit_recipes_use_deit_and_deit3_settings():
    for size in ("s", "b"):  # DeiT (2021) distilled: hard distillation from DeiT's RegNetY-16GF, 300 epochs
        r = load_recipe(RECIPES / f"deit_{size}16_distilled.yaml")
        kd = r.objective.distill
        assert (r.objective.name, kd.mode, kd.type, kd.alpha, kd.teacher) == ("distill", "token", "hard", 0.5, "timm:regnety_160.deit_in1k")
        assert (r.train.epochs, r.train.batch_size, r.optim.lr, r.optim.weight_decay, r.data.mixup, r.data.cutmix) == (300, 1024, 1e-3, 0.05, 0.8, 1.0)
        assert r.data.randaugment == "rand-m9-mstd0.5-inc1" and r.data.random_erasing == 0.25 and r.data.label_smoothing == 0.1
    for size, lr, drop_path in (("s", 4e-3, 0.05), ("b", 3e-3, 0.2)):  # DeiT III (2022), ImageNet-1k
        r = load_recipe(RECIPES / f"deit3_{size}16.yaml")
        d = r.data
        assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.train.batch_size, r.train.epochs) == ("lamb", lr, 0.05, 2048, 800)
        assert (d.three_augment, d.color_jitter, d.repeated_augment, d.loss, d.mixup, d.cutmix) == (True, 0.3, 3, "bce", 0.8, 1.0)
        assert d.label_smoothing == 0 and d.random_erasing == 0 and not d.randaugment and d.crop_pct == 1.0
        assert r.model.init_values == 1e-4 and r.model.drop_path_rate == drop_path


# ---------------------------------------------------------------------------------------------
# Naming a recipe: a file, or a shipped recipe by name


def test_every_shipped_recipe_is_the_checkouts_file():
    from vitcli import recipe_files

    assert recipe_files.shipped_names() == sorted(p.stem for p in RECIPES.glob("*.yaml"))
    for name in recipe_files.shipped_names():
        assert recipe_files.shipped(name).read_text() == (RECIPES / f"{name}.yaml").read_text()


def test_a_recipe_is_found_by_name_and_a_working_directory_file_wins(tmp_path, monkeypatch):
    from vitcli.recipe_files import locate

    monkeypatch.chdir(tmp_path)
    for arg in ("quickstart", "quickstart.yaml", "recipes/quickstart.yaml"):  # the last: outside the checkout
        found = locate(arg)
        assert found.shipped and found.path.read_text() == (RECIPES / "quickstart.yaml").read_text(), arg
        assert "the shipped recipe 'quickstart'" in found.origin
    (tmp_path / "quickstart.yaml").write_text("train: {epochs: 1}\n")
    for arg in ("quickstart", "quickstart.yaml"):
        found = locate(arg)
        assert not found.shipped and found.path.resolve() == (tmp_path / "quickstart.yaml").resolve()
        assert "working directory" in found.origin and "shadows the shipped recipe 'quickstart'" in found.origin
    assert load_recipe(locate("quickstart").path).train.epochs == 1
    (tmp_path / "mine.yaml").write_text("train: {epochs: 3}\n")
    assert locate("mine").origin == "the recipe file mine.yaml"


@pytest.mark.parametrize("arg, message", [
    ("quickstrat", "Did you mean: quickstart"),
    ("elsewhere/quickstart.yaml", "Recipe file 'elsewhere/quickstart.yaml' does not exist"),  # a path names a file, never a shipped recipe
    (".", "is a folder"),
])
def test_a_recipe_that_is_not_there_says_what_is(tmp_path, monkeypatch, arg, message):
    from vitcli.recipe_files import locate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(VitError, match=message):
        locate(arg)


def test_vit_recipes_lists_each_with_its_purpose_and_show_prints_it(capsys):
    from vitcli.cli import main
    from vitcli.recipe_files import purpose

    outputs = []
    for args in (["recipes"], ["recipes", "show", "vit_l16"], ["recipes", "show", "vit_l61"]):
        with pytest.raises(SystemExit) as stop:
            main(args)
        outputs.append((stop.value.code, *capsys.readouterr()))
    (code, listed, _), (code_show, shown, _), (code_bad, _, err) = outputs
    assert code == 0 and code_show == 0
    assert "quickstart" in listed and "vit_l16" in listed
    assert purpose(RECIPES / "vit_l16.yaml") == "ViT-L/16 pretraining on imagenet-21k with the hyper-parameters of the ViT paper"
    assert purpose(RECIPES / "vit_l16.yaml") in listed
    assert shown == (RECIPES / "vit_l16.yaml").read_text()
    assert code_bad == 2 and "Did you mean: vit_l16" in err
