"""Configuration: defaults, yaml, dotted overrides, unknown keys with suggestions, type and range checks, round trip."""

import logging
import os

import pytest
import yaml

from maskprop.train.config import (
    Config,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    SparsityConfig,
    changed_keys,
    config_to_dict,
    dotted,
    load_config,
    save_config,
)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_follow_the_paper_cifar_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.method == "vrpge" and cfg.seed == 0 and cfg.device == "auto" and cfg.amp == "none"
    assert cfg.model.name == "resnet20" and cfg.model.kwargs == {}
    assert cfg.data.dataset == "shapes" and cfg.data.root is None and cfg.data.batch_size == 256
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_epochs == 0 and cfg.optim.label_smoothing == 0.0
    assert cfg.optim.clip_grad_norm is None
    sparsity = cfg.sparsity
    assert (sparsity.keep_ratio, sparsity.estimator, sparsity.alpha) == (0.5, "vrpge", 0.5)
    assert sparsity.weight_grad == "first"
    assert (sparsity.init, sparsity.score_lr, sparsity.fix, sparsity.fix_samples) == (None, 12e-3, "best_of_n", 10)
    assert sparsity.prune_residual is True
    finetune = cfg.finetune
    assert (finetune.epochs, finetune.lr, finetune.momentum, finetune.weight_decay) == (40, 1e-3, 0.9, 5e-4)


def test_default_mutable_fields_are_not_shared():
    first, second = Config(), Config()
    first.model.kwargs["width"] = 2
    assert second.model.kwargs == {}


def test_yaml_values_override_defaults_and_keep_the_rest(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {
        "method": "dense",
        "model": {"name": "resnet32", "kwargs": {"width": 2}},
        "data": {"dataset": "cifar10", "root": "/data/cifar"},
        "optim": {"lr": 0.05, "epochs": 3},
    })
    cfg = load_config(path)
    assert cfg.method == "dense"
    assert cfg.model.name == "resnet32" and cfg.model.kwargs == {"width": 2}
    assert cfg.data.dataset == "cifar10" and cfg.data.root == "/data/cifar" and cfg.data.batch_size == 256
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 3 and cfg.optim.momentum == 0.9
    assert load_config(str(path)) == cfg


def test_empty_yaml_gives_defaults_and_says_so(tmp_path, caplog):
    """An empty file (a recipe not saved yet?) is yaml's null: the defaults, with a warning; ``{}`` means them."""
    with caplog.at_level(logging.WARNING):
        assert load_config(write_yaml(tmp_path / "empty.yaml", "# nothing yet\n")) == Config()
    assert ("holds no settings: the run takes every default (method vrpge, model resnet20, dataset shapes, 300 "
            "epochs); write {} in it to mean that") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_config(write_yaml(tmp_path / "defaults.yaml", "{}\n")) == Config()
    assert caplog.text == ""


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    # yaml 1.1 reads 12e-3 as a string; numeric fields accept it anyway.
    cfg = load_config(write_yaml(tmp_path / "run.yaml", "sparsity:\n  score_lr: 12e-3\noptim:\n  weight_decay: 1e-4\n"))
    assert cfg.sparsity.score_lr == pytest.approx(0.012) and isinstance(cfg.sparsity.score_lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("text", ["5e-4", "12e-3", "1E-3", "+.5e+0", "1.e-2", "2.5e-1", "9E-1", "0e0"])
def test_a_number_field_takes_exponent_text_as_yaml_1_1_leaves_it(text):
    # yaml.safe_load (YAML 1.1) reads 5e-4 as the text '5e-4': a recipe read that way loads as maskprop reads it.
    cfg = load_config({"optim": {"weight_decay": text, "momentum": text}, "sbp": {"memory": text}})
    for got in (cfg.optim.weight_decay, cfg.optim.momentum, cfg.sbp.memory):
        assert got == float(text) and type(got) is float
    cfg.finetune.weight_decay = text  # checked as assigned, too
    assert cfg.finetune.weight_decay == float(text)
    assert OptimConfig(label_smoothing=text).label_smoothing == float(text)  # and when a section is built


@pytest.mark.parametrize("text", ["abc", "0.5", "5", "5e-4x", "1e", "e5", "1e-4 ", " 1e-4", "1.5.e3", "1e+-3", "1_0e3",
                                  "0x1p3", "1e3.5", "inf", ".inf", "nan", "", "5e-4\n"])
def test_a_number_field_refuses_other_text(text):
    with pytest.raises(ValueError) as info:
        load_config({"optim": {"weight_decay": text}})
    assert str(info.value) == f"optim.weight_decay={text!r} has the wrong type; expected a number or null"
    with pytest.raises(ValueError) as info:
        load_config({"sparsity": {"keep_ratio": text}})
    assert str(info.value) == f"sparsity.keep_ratio={text!r} has the wrong type; expected a number"


def test_exponent_text_is_checked_as_the_number_it_is():
    with pytest.raises(ValueError, match=r"^sparsity.keep_ratio=2.0 is out of range; expected a fraction in \(0, 1\]$"):
        load_config({"sparsity": {"keep_ratio": "2e0"}})
    with pytest.raises(ValueError, match=r"^optim.lr=inf is not finite; expected a finite number$"):
        load_config({"optim": {"lr": "1e400"}})
    with pytest.raises(ValueError, match=r"^optim.lr=-0.001 is out of range; expected a number > 0 or null"):
        load_config({"optim": {"lr": "-1e-3"}})


def test_integer_and_other_fields_take_no_exponent_text():
    with pytest.raises(ValueError, match=r"^data.batch_size='1e3' has the wrong type; expected an integer$"):
        load_config({"data": {"batch_size": "1e3"}})
    with pytest.raises(ValueError, match=r"^optim.nesterov='1e0' has the wrong type; expected true or false$"):
        load_config({"optim": {"nesterov": "1e0"}})
    assert load_config({"out": "1e3", "model": {"kwargs": {"tag": "1e3"}}}).model.kwargs == {"tag": "1e3"}


def test_every_number_field_takes_exponent_text():
    # Each float of the (resolved) defaults, written as exponent text, gives the same configuration back.
    def as_text(tree):
        return {k: as_text(v) if isinstance(v, dict) else f"{v:.17e}" if type(v) is float else v
                for k, v in tree.items()}

    floats = as_text(config_to_dict(Config()))
    assert floats["sparsity"]["keep_ratio"] == "5.00000000000000000e-01" and floats["model"]["kwargs"] == {}
    assert load_config(floats) == Config()


def test_quoted_numbers_are_text_not_numbers(tmp_path):
    # Types are strict: a quoted number in yaml is text, and a number field says so instead of converting it.
    with pytest.raises(ValueError, match=r"^sparsity.keep_ratio='0.5' has the wrong type; expected a number$"):
        load_config(write_yaml(tmp_path / "run.yaml", 'sparsity:\n  keep_ratio: "0.5"\n'))
    with pytest.raises(ValueError, match=r"^data.batch_size='64' has the wrong type; expected an integer$"):
        load_config({"data": {"batch_size": "64"}})
    with pytest.raises(ValueError, match=r"^sparsity.keep_ratio=True has the wrong type; expected a number$"):
        load_config(None, ["sparsity.keep_ratio=true"])


def test_a_section_header_with_nothing_under_it_gives_the_section_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "run.yaml", "optim:\nsparsity:\n  keep_ratio: 0.25\n"))
    assert cfg.optim == Config().optim and cfg.sparsity.keep_ratio == 0.25


def test_overrides_nested_typed_and_applied_after_yaml(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"optim": {"lr": 0.05}, "data": {"dataset": "cifar100"}})
    cfg = load_config(path, [
        "data.root=/x", "optim.lr=0.2", "sparsity.keep_ratio=0.25", "model.kwargs.width=2",
        "model.kwargs.stages=[3, 3, 3]", "optim.nesterov=true", "optim.clip_grad_norm=3", "optim.epochs=5",
        "sparsity.score_lr=5e-3",
    ])
    assert cfg.data.root == "/x" and cfg.data.dataset == "cifar100"
    assert cfg.optim.lr == 0.2 and cfg.optim.nesterov is True and cfg.optim.epochs == 5
    assert cfg.optim.clip_grad_norm == 3.0 and isinstance(cfg.optim.clip_grad_norm, float)
    assert cfg.sparsity.keep_ratio == 0.25 and cfg.sparsity.score_lr == pytest.approx(5e-3)
    assert cfg.model.kwargs == {"width": 2, "stages": [3, 3, 3]}


def test_override_of_a_whole_section_merges_and_null_resets_optional():
    cfg = load_config({"optim": {"clip_grad_norm": 3.0}}, ["optim={lr: 0.01, epochs: 2}", "optim.clip_grad_norm=null"])
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 2 and cfg.optim.momentum == 0.9
    assert cfg.optim.clip_grad_norm is None


def test_string_fields_keep_the_override_text_verbatim():
    cfg = load_config(None, ["out=2024", "data.root=/data/0001", "model.name=vgg19", "device=cuda:1"])
    assert cfg.out == "2024" and cfg.data.root == "/data/0001" and cfg.model.name == "vgg19" and cfg.device == "cuda:1"
    assert load_config(None, ["out=null"]).out is None


def test_load_config_from_mapping_and_from_config_does_not_alias():
    base = load_config({"model": {"kwargs": {"width": 2}}})
    derived = load_config(base, ["model.kwargs.width=4"])
    assert base.model.kwargs == {"width": 2} and derived.model.kwargs == {"width": 4}
    assert load_config({"optim": OptimConfig(lr=0.3)}).optim.lr == 0.3


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["sparsity.keep_ration=0.1"], "unknown config key 'sparsity.keep_ration'; did you mean 'sparsity.keep_ratio'?"),
    (["lr=0.1"], "unknown config key 'lr'; did you mean 'optim.lr'?"),
    (["optm.lr=0.1"], "unknown config key 'optm'; did you mean 'optim'?"),
    (["data.batchsize=8"], "unknown config key 'data.batchsize'; did you mean 'data.batch_size'?"),
])
def test_unknown_override_key_names_it_and_the_closest_key(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


def test_unknown_yaml_key_at_any_level_names_it_and_the_closest_key(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"finetune": {"epochs": 3, "learning_rate": 0.1}})
    with pytest.raises(ValueError, match=r"^unknown config key 'finetune.learning_rate'"):
        load_config(path)
    path = write_yaml(tmp_path / "top.yaml", {"methd": "dense"})
    with pytest.raises(ValueError, match=r"^unknown config key 'methd'; did you mean 'method'\?$"):
        load_config(path)
    path = write_yaml(tmp_path / "section.yaml", {"optim": {"lr": 0.1}, "optimizer": {"epochs": 3}})
    with pytest.raises(ValueError, match=r"^unknown config key 'optimizer'; did you mean 'optim'\?$"):
        load_config(path)


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(ValueError) as info:
        load_config(None, ["sparsity.zzzzzz=1"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown config key 'sparsity.zzzzzz'; valid keys in 'sparsity': keep_ratio, estimator")


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["sparsity.keep_ratio=0"], r"^sparsity.keep_ratio=0.0 is out of range; expected a fraction in \(0, 1\]$"),
    (["sparsity.keep_ratio=1.5"], r"^sparsity.keep_ratio=1.5 is out of range"),
    (["sparsity.alpha=1"], r"^sparsity.alpha=1.0 is out of range; expected a number in \[0, 1\)$"),
    (["sparsity.alpha=-0.1"], r"^sparsity.alpha=-0.1 is out of range"),
    (["sparsity.fix_samples=0"], r"^sparsity.fix_samples=0 is out of range; expected an integer >= 1$"),
    (["data.batch_size=0"], r"^data.batch_size=0 is out of range; expected an integer >= 1$"),
    (["data.workers=-1"], r"^data.workers=-1 is out of range"),
    (["optim.lr=-0.1"], r"^optim.lr=-0.1 is out of range; expected a number > 0 or null \(the optimizer.s default\)$"),
    (["optim.warmup_epochs=10", "optim.epochs=5"], r"^optim.warmup_epochs=10 is out of range; .*optim.epochs=5"),
    (["finetune.epochs=-1"], r"^finetune.epochs=-1 is out of range"),
    (["sbp.memory=1"], r"^sbp.memory=1.0 is out of range; expected a number in \[0, 1\)$"),
    (["sbp.ratio=0"], r"^sbp.ratio=0.0 is out of range; expected a fraction in \(0, 1\]$"),
    (["sbp.output_k=0"], r"^sbp.output_k=0 is out of range; expected an integer >= 1 or null"),
    (["sbp.angle_every=-1"], r"^sbp.angle_every=-1 is out of range; expected an integer >= 0 \(0: never\)$"),
    (["sparsity.align=0"], r"^sparsity.align=0 is out of range; expected an integer >= 1 or null \(8 on CUDA, 1 on"),
    (["model.name="], r"^model.name=None has the wrong type; expected a string$"),
    (["sbp.sparsifier=topk_per_row"], r"^sbp.sparsifier='topk_per_row' is not a valid choice; expected one of 'topk'"),
    (["method=meprop", "sbp.sparsifier=randomk"], r"^sbp.sparsifier='randomk' does not fit method='meprop'"),
    (["method=msbp", "sbp.memory=0"], r"^sbp.memory=0.0 gives no memory; expected a memory ratio in \(0, 1\)"),
    (["optim.optimizer=lamb"], r"^optim.optimizer='lamb' is not a valid choice; expected one of 'sgd', 'adam'$"),
    (["optim.lr=fast"], r"^optim.lr='fast' has the wrong type; expected a number or null$"),
    (["device=gpu"], r"^device='gpu' is not a valid choice; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'$"),
    (["sparsity.keep_ratio=half"], r"^sparsity.keep_ratio='half' has the wrong type; expected a number$"),
    (["optim.epochs=2.5"], r"^optim.epochs=2.5 has the wrong type; expected an integer$"),
    (["optim.nesterov=1"], r"^optim.nesterov=1 has the wrong type; expected true or false$"),
    (["optim.lr=.inf"], r"^optim.lr=inf is not finite; expected a finite number$"),
    (["optim.clip_grad_norm=abc"], r"^optim.clip_grad_norm='abc' has the wrong type; expected a number or null$"),
    (["data.dataset=svhn"], r"^data.dataset='svhn' is not a valid choice; expected one of 'shapes', 'mnist'"),
    (["sparsity.estimator=reinforce"], r"^sparsity.estimator='reinforce' is not a valid choice; expected one of"),
    (["amp=fp16"], r"^amp='fp16' is not a valid choice; expected one of 'none', 'bf16'$"),
    (["model.kwargs=3"], r"^model.kwargs=3 has the wrong type; expected a mapping$"),
    (["optim=3"], r"^optim=3 has the wrong type; expected a mapping of its keys"),
    (["data.batch_size=null"], r"^data.batch_size=None has the wrong type; expected an integer$"),
])
def test_bad_values_give_one_line_errors_with_key_value_and_expectation(overrides, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


LONGER_THAN_THE_SEARCH = "is longer than the search; expected at most optim.epochs=10 in all"
NO_MASK = "samples no channel mask; expected method='vrpge'"


@pytest.mark.parametrize(("overrides", "message"), [
    (["sparsity.anneal_epochs=-1"],
     "sparsity.anneal_epochs=-1 is out of range; expected an integer >= 0 (0: no anneal)"),
    (["sparsity.warmup_epochs=-1"], "sparsity.warmup_epochs=-1 is out of range; expected an integer >= 0"),
    (["optim.epochs=10", "sparsity.anneal_epochs=11"],
     f"sparsity.warmup_epochs=0 + sparsity.anneal_epochs=11 {LONGER_THAN_THE_SEARCH}"),
    (["optim.epochs=10", "sparsity.warmup_epochs=4", "sparsity.anneal_epochs=7"],
     f"sparsity.warmup_epochs=4 + sparsity.anneal_epochs=7 {LONGER_THAN_THE_SEARCH}"),
    (["sparsity.budget_unit=params"],
     "sparsity.budget_unit='params' is not a valid choice; expected one of 'channels', 'flops'"),
    (["sparsity.budget_schedule=cos"],
     "sparsity.budget_schedule='cos' is not a valid choice; expected one of 'cubic', 'linear'"),
    (["method=dense", "sparsity.fix=random"],
     f"sparsity.fix='random' trains a random subnetwork of the VR-PGE budget, but method='dense' {NO_MASK}"),
    (["method=msbp", "sparsity.fix=random"],
     f"sparsity.fix='random' trains a random subnetwork of the VR-PGE budget, but method='msbp' {NO_MASK}"),
])
def test_bad_search_keys_give_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=3", "optim.lr=[1, 2"])
def test_malformed_overrides_are_rejected(text):
    with pytest.raises(ValueError, match="override"):
        load_config(None, [text])


def test_override_below_a_scalar_is_rejected():
    with pytest.raises(ValueError, match=r"'optim.lr' is 0.1, not a mapping"):
        load_config({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"not valid yaml at line 3"):
        load_config(write_yaml(tmp_path / "broken.yaml", "optim:\n  lr: [0.1\n"))
    with pytest.raises(ValueError, match=r"must hold a mapping of keys at the top; got list"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_direct_construction_validates_and_coerces():
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)
    with pytest.raises(ValueError, match=r"^sparsity.keep_ratio=0.0 is out of range"):
        SparsityConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match=r"^data.dataset='svhn' is not a valid choice"):
        DataConfig(dataset="svhn")
    with pytest.raises(ValueError, match=r"^finetune.lr=0.0 is out of range"):
        FinetuneConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"^model.name='' is too short; expected at least 1 character$"):
        ModelConfig(name="")
    cfg = Config()
    with pytest.raises(ValueError, match=r"^optim.momentum=1.5 is out of range"):
        cfg.optim.momentum = 1.5  # checked when assigned, and left as it was
    assert cfg.optim.momentum == 0.9
    with pytest.raises(ValueError, match=r"^optim.warmup_epochs=400 is out of range; .*optim.epochs=300\]$"):
        cfg.optim.warmup_epochs = 400  # a check across fields fails after the value is set: undone too
    assert cfg.optim.warmup_epochs == 0
    cfg.optim.lr = 2  # converted as a value read from yaml is
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)


def test_search_keys_fit_the_search_and_the_method():
    cfg = load_config(None, ["optim.epochs=10", "sparsity.warmup_epochs=3", "sparsity.anneal_epochs=7",
                             "sparsity.budget_schedule=linear", "sparsity.fix=top_scores"])
    assert (cfg.sparsity.warmup_epochs, cfg.sparsity.anneal_epochs) == (3, 7) and cfg.sparsity.fix == "top_scores"
    assert load_config(None, ["sparsity.warmup_epochs=3", "sparsity.fix=random"]).sparsity.fix == "random"
    assert cfg.sparsity.budget_schedule == "linear" and Config().sparsity.budget_schedule == "cubic"
    # Only VR-PGE searches: the other methods leave the search keys unread, so they are not held to optim.epochs.
    assert load_config(None, ["method=dense", "optim.epochs=2", "sparsity.anneal_epochs=5"]).optim.epochs == 2
    cfg = Config(method="dense")
    cfg.sparsity.fix = "random"  # fine for the section alone; validate() sees the method
    with pytest.raises(ValueError, match=r"^sparsity.fix='random' trains a random subnetwork"):
        cfg.validate()
    cfg = Config(optim={"epochs": 10})
    cfg.sparsity.anneal_epochs = 20
    with pytest.raises(ValueError, match=r"^sparsity.warmup_epochs=0 \+ sparsity.anneal_epochs=20 is longer"):
        cfg.validate()


def test_sections_can_be_given_as_mappings():
    cfg = Config(method="dense", optim={"lr": 3, "epochs": 2}, model={"kwargs": {"width": 2}})
    assert cfg.optim.lr == 3.0 and cfg.optim.epochs == 2 and cfg.optim.momentum == 0.9
    assert cfg.model.name == "resnet20" and cfg.model.kwargs == {"width": 2}
    assert cfg == load_config({"method": "dense", "optim": {"lr": 3.0, "epochs": 2}, "model": {"kwargs": {"width": 2}}})
    with pytest.raises(ValueError, match=r"^unknown config key 'optim.lrr'; did you mean 'optim.lr'\?$"):
        Config(optim={"lrr": 3})


def test_validate_rechecks_edits_the_assignment_cannot_see():
    cfg = Config(method="meprop")
    cfg.sbp.sparsifier = "randomk"  # fine for the section alone, not for the method
    with pytest.raises(ValueError, match=r"^sbp.sparsifier='randomk' does not fit method='meprop'"):
        cfg.validate()
    cfg = Config()
    cfg.model.kwargs[3] = "x"
    with pytest.raises(ValueError, match=r"^model.kwargs key 3 has the wrong type; expected a string$"):
        cfg.validate()
    cfg = Config()
    cfg.optim.lr = None
    cfg.validate()
    assert cfg.optim.lr == 0.1  # null is resolved again to the optimizer's default


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config(None, ["method=msbp", "model.kwargs.width=2", "model.kwargs.stages=[5, 5, 5]", "data.root=/d",
                             "optim.clip_grad_norm=3", "sparsity.keep_ratio=0.125", "out=runs/a", "amp=bf16"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    assert list(yaml.safe_load(path.read_text())) == list(Config.model_fields)


def test_text_that_reads_as_a_number_is_saved_quoted(tmp_path):
    cfg = load_config(None, ["out=1e3", "data.root=2e-5", "model.kwargs.tag=1e3"])
    assert (cfg.out, cfg.data.root, cfg.model.kwargs) == ("1e3", "2e-5", {"tag": 1000.0})
    cfg.model.kwargs["name"] = "5e-1"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config(None, ["optim.lr=0.3"]), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_config_to_dict_is_a_deep_copy():
    cfg = load_config(None, ["model.kwargs.width=2"])
    data = config_to_dict(cfg)
    data["model"]["kwargs"]["width"] = 8
    assert cfg.model.kwargs["width"] == 2
    assert data["sparsity"]["keep_ratio"] == 0.5


def test_defaults_of_the_sparse_backward_and_remaining_keys_are_the_documented_ones():
    # README / docs/methods.md: sbp.memory 0.8, sbp.angle_every 100, sbp.scale rms, sparsity.capacity_quantile 0.999.
    cfg = Config()
    sbp = cfg.sbp
    assert (sbp.ratio, sbp.memory, sbp.sparsifier, sbp.budget, sbp.scale, sbp.output_k, sbp.angle_every) == (
        0.04, 0.8, "topk_unified", "layer", "rms", None, 100)
    assert (cfg.sparsity.capacity_quantile, cfg.sparsity.align, cfg.sparsity.fix_examples) == (0.999, None, None)
    assert (cfg.sparsity.warmup_epochs, cfg.sparsity.anneal_epochs, cfg.sparsity.budget_unit) == (0, 0, "channels")
    assert cfg.finetune.narrow is True and cfg.optim.nesterov is False
    assert (cfg.channels_last, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.sync_bn, cfg.cuda_graphs) == (
        True, 50, 1, 1, False, "auto")


@pytest.mark.parametrize(("key", "inside", "outside", "expected"), [
    ("sparsity.init", [1, 1e-9], [0, 1.5], r"a probability in \(0, 1\]"),
    ("sparsity.capacity_quantile", [0.5, 0.9999], [0.4999, 1], r"a number in \[0.5, 1\)"),
    ("sparsity.fix_examples", [1], [0], r"an integer >= 1 or null"),
    ("sparsity.keep_ratio", [1, 1e-9], [0, 1.0000001], r"a fraction in \(0, 1\]"),
    ("sbp.ratio", [1, 1e-9], [0, 1.5], r"a fraction in \(0, 1\]"),
    ("sbp.memory", [0, 0.999], [1, -0.1], r"a number in \[0, 1\)"),
    ("optim.momentum", [0, 0.999], [1, -0.1], r"a number in \[0, 1\)"),
    ("optim.label_smoothing", [0, 0.999], [1, -0.1], r"a number in \[0, 1\)"),
    ("optim.clip_grad_norm", [1e-9], [0, -1], r"a number > 0 or null"),
    ("optim.weight_decay", [0], [-1e-9], r"a number >= 0 or null"),
    ("finetune.momentum", [0, 0.999], [1], r"a number in \[0, 1\)"),
    ("finetune.weight_decay", [0], [-1e-9], r"a number >= 0"),
    ("log_every", [1], [0], r"an integer >= 1"),
    ("eval_every", [0], [-1], r"an integer >= 0 \(0: only at the end\)"),
    ("save_every", [0], [-1], r"an integer >= 0 \(0: only at the end\)"),
    ("seed", [0], [-1], r"an integer >= 0"),
    ("data.image_size", [8], [7], r"an integer >= 8"),
    ("data.crop_size", [8], [7], r"an integer >= 8"),
    ("data.train_size", [1], [0], r"an integer >= 1"),
    ("data.val_size", [1], [0], r"an integer >= 1"),
])
def test_each_bound_is_where_its_message_says(key, inside, outside, expected):
    # The bounds themselves, both sides of each: a value on a closed end loads, one on an open end or past it is
    # refused with the interval the message states.
    section, _, name = key.rpartition(".")
    for value in inside:
        cfg = load_config(None, [f"{key}={value}"])
        assert getattr(getattr(cfg, section) if section else cfg, name) == value
    for value in outside:
        with pytest.raises(ValueError, match=rf"^{key}=\S+ is out of range; expected {expected}"):
            load_config(None, [f"{key}={value}"])


def test_optim_checks_across_its_fields_at_their_boundaries():
    assert load_config(None, ["optim.epochs=5", "optim.warmup_epochs=5"]).optim.warmup_epochs == 5  # all warm-up
    with pytest.raises(ValueError, match=r"^optim.warmup_epochs=6 is out of range; expected an integer in "
                                         r"\[0, optim.epochs=5\]$"):
        load_config(None, ["optim.epochs=5", "optim.warmup_epochs=6"])
    assert load_config(None, ["optim.nesterov=true", "optim.momentum=0.5"]).optim.nesterov is True
    with pytest.raises(ValueError, match=r"^optim.nesterov=True needs optim.momentum > 0; got optim.momentum=0.0$"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])


@pytest.mark.parametrize(("method", "optimizer", "lr", "weight_decay"), [
    ("vrpge", "sgd", 0.1, 5e-4), ("dense", "sgd", 0.1, 5e-4),
    ("meprop", "adam", 1e-3, 0.0), ("sbp", "adam", 1e-3, 0.0), ("msbp", "adam", 1e-3, 0.0),
])
def test_null_optimizer_settings_resolve_to_the_methods_defaults(method, optimizer, lr, weight_decay, caplog):
    # optim.optimizer null: Adam for the sparse-backward methods, SGD otherwise; lr and weight_decay null: the
    # optimizer's defaults (SGD 0.1 and 5e-4, Adam 1e-3 and 0); values the config sets are kept as they are.
    optim = load_config(None, [f"method={method}"]).optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == (optimizer, lr, weight_decay)
    other = "adam" if optimizer == "sgd" else "sgd"
    optim = load_config(None, [f"method={method}", f"optim.optimizer={other}"]).optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == ((other, 1e-3, 0.0) if other == "adam" else
                                                                 (other, 0.1, 5e-4))
    with caplog.at_level("WARNING", logger="maskprop.train.config"):
        optim = load_config(None, [f"method={method}", "optim.lr=0.05", "optim.weight_decay=1e-4"]).optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == (optimizer, 0.05, 1e-4)
    # The warning of an Adam default meeting a learning rate set for SGD is given where Adam is the default only.
    assert ("trains with Adam" in caplog.text) == (optimizer == "adam")


def test_cross_section_checks_hold_for_every_method():
    for method in ("dense", "meprop", "sbp", "msbp"):
        with pytest.raises(ValueError, match=rf"^sparsity.fix='random' .* but method='{method}' samples no channel"):
            load_config(None, [f"method={method}", "sparsity.fix=random"])
    assert load_config(None, ["method=sbp", "sbp.sparsifier=randomk"]).sbp.sparsifier == "randomk"
    assert load_config(None, ["method=sbp", "sbp.memory=0"]).sbp.memory == 0.0  # no memory: fine for SBP


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None])
def test_cuda_graphs_takes_only_auto_true_or_false(value):
    for good in ("auto", True, False):
        got = load_config({"cuda_graphs": good}).cuda_graphs
        assert got == good and type(got) is type(good)
    with pytest.raises(ValueError, match=r"^cuda_graphs=.* is not a valid choice; expected 'auto', true or false$"):
        load_config({"cuda_graphs": value})


def test_override_of_cuda_graphs_and_device_parse_as_their_fields_take_them():
    # cuda_graphs is 'auto' or a switch: its override text is read as yaml (true, a bool), not kept as text.
    assert load_config(None, ["cuda_graphs=true"]).cuda_graphs is True
    assert load_config(None, ["cuda_graphs=false"]).cuda_graphs is False
    assert load_config(None, ["cuda_graphs=auto"]).cuda_graphs == "auto"
    assert load_config(None, ["device=cuda:12"]).device == "cuda:12"  # any device index, not one digit


def test_override_value_is_everything_after_the_first_equals_sign():
    cfg = load_config(None, ["data.root=/data/a=b", "model.kwargs.tag=x=1", "out= runs/a b "])
    assert cfg.data.root == "/data/a=b" and cfg.model.kwargs == {"tag": "x=1"}
    assert cfg.out == " runs/a b "  # a string field takes the text as written, spaces included


def test_override_of_a_mapping_merges_into_the_mapping_at_every_depth():
    cfg = load_config({"optim": {"clip_grad_norm": 3.0, "epochs": 7}, "model": {"kwargs": {"width": 2, "x": {"a": 1}}}},
                      ["optim={lr: 0.01}", "model={kwargs: {depth: 3, x: {b: 2}}}"])
    assert (cfg.optim.lr, cfg.optim.clip_grad_norm, cfg.optim.epochs) == (0.01, 3.0, 7)
    assert cfg.model.kwargs == {"width": 2, "depth": 3, "x": {"a": 1, "b": 2}}
    # A value that is not a mapping replaces what was there.
    assert load_config({"model": {"kwargs": {"x": {"a": 1}}}}, ["model.kwargs.x=5"]).model.kwargs == {"x": 5}


def test_a_single_override_may_be_given_as_a_string():
    assert load_config(None, "optim.lr=0.3").optim.lr == 0.3


def test_load_config_from_a_mapping_does_not_alias_its_values():
    source = {"model": {"kwargs": {"stages": [3, 3, 3]}}}
    cfg = load_config(source)
    cfg.model.kwargs["stages"].append(4)
    assert source == {"model": {"kwargs": {"stages": [3, 3, 3]}}}


def test_dotted_flattens_nested_settings_keeping_leaves_and_empty_mappings_whole():
    settings = {"method": "dense", "optim": {"lr": 0.1, "sub": {"x": 1}}, "model": {"kwargs": {"width": 2}},
                "empty": {}}
    assert dotted(settings) == {"method": "dense", "optim.lr": 0.1, "optim.sub.x": 1, "model.kwargs.width": 2,
                                "empty": {}}
    assert dotted(settings, leaves=("kwargs",)) == {"method": "dense", "optim.lr": 0.1, "optim.sub.x": 1,
                                                    "model.kwargs": {"width": 2}, "empty": {}}


def test_changed_keys_names_every_differing_or_missing_key_sorted():
    a = {"optim.lr": 0.1, "seed": 0, "method": "dense", "only.a": 1}
    b = {"optim.lr": 0.2, "seed": 0, "method": "dense", "only.b": None}
    assert changed_keys(a, b) == ["only.a", "only.b", "optim.lr"]
    assert changed_keys(a, a) == [] and changed_keys({}, {"x": 1}) == ["x"]


def test_a_key_given_twice_in_a_recipe_is_one_line_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a recipe with a second ``sparsity:`` section (one appended at the end,
    say) lost every setting of the first without a word, and trained at the default keep ratio. Now one line names the
    key and both lines; YAML's merge key (``<<``) still merges, and a later key still overrides a merged one."""
    path = tmp_path / "twice.yaml"
    path.write_text("sparsity:\n  keep_ratio: 0.25\ndata:\n  batch_size: 64\nsparsity:\n  fix: random\n")
    with pytest.raises(ValueError, match=rf"^config file '{path}' is not valid yaml at line 5, column 1: key "
                                         r"'sparsity' is given twice \(first at line 1\); expected each key once$"):
        load_config(path)
    path.write_text("optim:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(ValueError, match=r"at line 4, column 3: key 'lr' is given twice \(first at line 2\)"):
        load_config(path)
    with pytest.raises(ValueError, match=r"^override 'model.kwargs=\{a: 1, a: 2\}': value is not valid yaml \(key "
                                         r"'a' is given twice"):
        load_config(None, ["model.kwargs={a: 1, a: 2}"])
    path.write_text("optim: &base\n  lr: 0.1\n  epochs: 3\nfinetune:\n  <<: *base\n  lr: 0.01\n")
    config = load_config(path)
    assert (config.optim.lr, config.finetune.lr, config.finetune.epochs) == (0.1, 0.01, 3)
