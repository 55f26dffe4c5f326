import pytest

from magnet.config import Config, ConfigError, load_config, parse_overrides


def test_overrides_nest_and_parse_yaml_values():
    overrides = ["train.lr=1e-4", "model.fusion.use_cam=false", "data.eval_splits=[val, testA]"]
    assert parse_overrides(overrides) == {
        "train": {"lr": 1e-4},
        "model": {"fusion": {"use_cam": False}},
        "data": {"eval_splits": ["val", "testA"]},
    }


def test_preset_by_name_and_override_applied():
    cfg = load_config("tiny", ["train.lr=0.001", "model.loss.lambda_mg=0.5"])
    assert cfg.name == "tiny"
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.model.loss.lambda_mg == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=-1", "train.lr"),
        ("model.decoder.kind=unet", "model.decoder.kind"),
        ("noequals", "section.key=value"),
        ("model.mask_grounding.replace_mask_prob=0.95", "replace_mask_prob"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("tiny", [override])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"known presets: .*tiny"):
        load_config("no-such-preset")


def test_flat_has_dotted_leaves():
    flat = Config().flat()
    assert flat["model.vision.embed_dim"] == 128
    assert flat["train.lr"] == pytest.approx(5e-5)


def test_base_preset_is_merged_under_the_child(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nname: child\ntrain:\n  lr: 0.001\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model == load_config("tiny").model
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


def test_yaml_syntax_error_in_a_config_file_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ntrain:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"{broken}:\d+: invalid YAML"):
        load_config(broken)


def test_yaml_syntax_error_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'data.eval_splits=\[val':1: invalid YAML"):
        load_config("tiny", ["data.eval_splits=[val"])


def test_empty_override_is_an_error_not_none():
    with pytest.raises(ConfigError, match=r"'train.max_steps=' has no value"):
        load_config("tiny", ["train.max_steps="])
    assert load_config("tiny", ["train.max_steps=null"]).train.max_steps is None


def test_preset_name_wins_over_a_folder_or_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "paper").write_text("name: not-the-preset\n")
    assert load_config("tiny").name == "tiny"
    assert load_config("paper").name == "paper"
    assert load_config("./paper").name == "not-the-preset"
    with pytest.raises(ConfigError, match="config file tiny does not exist"):
        load_config("./tiny")


def test_paper_preset_states_the_reference_recipe():
    cfg = load_config("paper")
    train = cfg.train
    assert (train.global_batch, cfg.data.batch_size, train.grad_accum) == (32, 8, 1)
    assert (train.lr, train.weight_decay, train.poly_power, train.warmup_steps) == (5e-5, 0.01, 0.9, 0)
    assert (train.epochs, train.max_steps, train.grad_clip, train.precision) == (40, None, None, "fp32")
    assert {"relative_position_bias_table", "position_embeddings", "level_embed"} <= set(train.no_decay_names)
    params = cfg.flat()  # what pipelines.tracking logs as MLflow params
    for key in ("global_batch", "lr", "weight_decay", "no_decay_names", "poly_power", "epochs", "grad_clip"):
        assert f"train.{key}" in params
    assert params["train.precision"] == "fp32" and params["data.batch_size"] == 8


def test_cli_reports_a_broken_config_in_one_message_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1\n")
    result = CliRunner().invoke(app, ["config", "--config", str(broken)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    squashed = "".join(result.output.replace("│", "").split())  # the error box wraps long lines
    assert "broken.yaml:3:invalidYAML" in squashed
