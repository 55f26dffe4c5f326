import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from magnet.checkpoint import checkpoint_name
from magnet.config import TrainConfig, load_config
from magnet.models import build_model
from magnet.train import (
    STAGING_PREFIX,
    LocalReporter,
    StepEvent,
    build_optimizer,
    build_scheduler,
    global_batch_mismatch,
    lr_factor,
    param_groups,
    remove_orphaned_staging,
    train,
    train_step,
)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.query_embed = nn.Embedding(1, 4)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_no_weight_decay_on_norms_biases_and_position_tables():
    model = _Toy()
    decay, no_decay = param_groups(model, 0.05, TrainConfig().no_decay_names, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"proj.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "relative_position_bias_table",
        "level_embed",
        "query_embed.weight",
    }


def test_paper_model_decays_no_norm_nor_position_or_query_table():
    cfg = load_config("paper")
    model = build_model(cfg.model, "meta")
    decay, _ = param_groups(model, 0.01, cfg.train.no_decay_names, lr=cfg.train.lr)
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
    norm_params = [p for m in model.modules() if isinstance(m, norms) for p in m.parameters()]
    assert norm_params and not decayed & {id(p) for p in norm_params}
    tables = {
        "relative_position_bias_table": 24,  # Swin-B: one per block
        "language_model.embeddings.position_embeddings.weight": 1,  # BERT
        "language_model.embeddings.token_type_embeddings.weight": 1,
        "level_embed": 2,  # pixel decoder and masked-attention decoder
        "query_embed.weight": 1,
        "query_feat.weight": 1,
        "mask_grounding.pos_embed": 1,
    }
    for part, count in tables.items():
        found = [i for i, n in names.items() if part in n]
        assert len(found) == count and not decayed & set(found), part
    assert {"image_model.patch_embed.proj.weight", "language_model.embeddings.word_embeddings.weight"} <= {
        names[id(p)] for p in decay["params"]
    }
    assert all(p.ndim >= 2 for p in decay["params"])


def test_global_batch_mismatch_names_the_numbers():
    cfg = load_config("paper")
    assert global_batch_mismatch(cfg, world_size=4) is None
    message = global_batch_mismatch(cfg, world_size=2)
    assert message == (
        "global batch 16 = 2 workers x data.batch_size 8 x train.grad_accum 1 differs from the "
        "preset's train.global_batch 32"
    )
    assert global_batch_mismatch(load_config("paper", ["train.grad_accum=2"]), world_size=2) is None
    assert global_batch_mismatch(load_config("tiny"), world_size=3) is None  # no expectation stated


def test_poly_schedule_per_step():
    assert lr_factor(0, 100, 0.9) == 1.0
    assert lr_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, 0.9) == 0.0
    assert lr_factor(150, 100, 0.9) == 0.0  # never negative past the end


def test_warmup_ramps_linearly_then_decays():
    assert lr_factor(0, 100, 1.0, warmup_steps=4) == pytest.approx(0.25 * 1.0)
    assert lr_factor(1, 100, 1.0, warmup_steps=4) == pytest.approx(0.5 * 0.99)
    assert lr_factor(3, 100, 1.0, warmup_steps=4) == pytest.approx(0.97)
    assert lr_factor(10, 100, 1.0, warmup_steps=4) == pytest.approx(0.90)


def test_scheduler_steps_the_optimizer_lr():
    cfg = TrainConfig(lr=1e-3, poly_power=0.9)
    model = _Toy()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-3 * (1 - s / 10) ** 0.9 for s in range(3)])
    assert all(math.isclose(g["lr"], optimizer.param_groups[0]["lr"]) for g in optimizer.param_groups)


def test_pretrained_text_encoder_trains_at_its_scaled_lr_through_the_schedule():
    """Only the BERT weights (embeddings, layers) slow down; the text side's fusion layers and the
    rest keep the base lr, and the poly schedule keeps the ratio."""
    cfg = load_config("tiny", ["train.lr=1e-3", "train.pretrained_text_lr_scale=0.1"]).train
    model = build_model(load_config("tiny").model, "meta")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(round(group["lr"], 12), set()).update(names[id(p)] for p in group["params"])
    slow, fast = by_lr[1e-4], by_lr[1e-3]
    assert set(by_lr) == {1e-4, 1e-3}
    assert "language_model.embeddings.word_embeddings.weight" in slow
    assert any(n.startswith("language_model.encoder.layer.0.") for n in slow)
    assert all(n.startswith(("language_model.embeddings.", "language_model.encoder.")) for n in slow)
    assert any(n.startswith("language_model.pwams.") for n in fast)
    assert any(n.startswith("image_model.") for n in fast)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = sorted({round(g["lr"] / optimizer.param_groups[0]["lr"], 9) for g in optimizer.param_groups})
    assert lrs == [0.1, 1.0]


class _Regressor(nn.Module):
    """Stands in for MagNet's interface: a mean-squared loss over pixels, in ``losses``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, image, input_ids, attention_mask, target_mask):
        loss = ((image.mean(1) * self.scale - target_mask) ** 2).mean()
        return SimpleNamespace(losses={"loss": loss})


def _step_result(micro_batches, grad_clip=None):
    model = _Regressor()
    cfg = TrainConfig(lr=0.1, weight_decay=0.0, grad_clip=grad_clip, precision="fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    losses = train_step(model, micro_batches, optimizer, scheduler, cfg, torch.device("cpu"))
    return model.scale.item(), losses


def test_gradient_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, 5, 5),
        "mask": torch.rand(4, 5, 5),
        "input_ids": torch.zeros(4, 3, dtype=torch.int64),
        "attention_mask": torch.ones(4, 3, dtype=torch.int64),
    }
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole_scale, whole_losses = _step_result([batch])
    split_scale, split_losses = _step_result(halves)
    assert split_scale == pytest.approx(whole_scale, abs=1e-6)
    assert split_losses["loss"] == pytest.approx(whole_losses["loss"], abs=1e-6)
    _, clipped = _step_result([batch], grad_clip=1e-3)
    assert clipped["grad_norm"] > 1e-3  # the norm before clipping is reported


def test_without_clipping_the_gradient_is_untouched_and_its_norm_still_logged():
    batch = {
        "image": torch.full((2, 3, 2, 2), 2.0),
        "mask": torch.zeros(2, 2, 2),
        "input_ids": torch.zeros(2, 3, dtype=torch.int64),
        "attention_mask": torch.ones(2, 3, dtype=torch.int64),
    }
    # loss = (2 * scale)**2 at scale 1: gradient 8, so one SGD step of lr 0.1 lands at 1 - 0.8
    scale, losses = _step_result([batch], grad_clip=None)
    assert scale == pytest.approx(0.2) and losses["grad_norm"] == pytest.approx(8.0)
    clipped_scale, clipped = _step_result([batch], grad_clip=1.0)
    assert clipped_scale == pytest.approx(0.9) and clipped["grad_norm"] == pytest.approx(8.0)


# ------------------------------------------------------------------ the loop on tiny shards
@pytest.fixture(scope="module")
def shards(synthetic_shards) -> str:
    return str(synthetic_shards(num_images=24, image_size=64, seed=0, samples_per_shard=8))


def tiny_config(*overrides: str):
    return load_config(
        "tiny",
        [
            "model.image_size=64",
            "data.batch_size=2",
            "data.loader_workers=0",
            "data.eval_splits=[]",
            "train.max_steps=2",
            "train.checkpoint_every=1",
            "train.lr=1e-3",
            *overrides,
        ],
    )


class _Stop(Exception):
    pass


def test_restored_run_continues_exactly_like_an_uninterrupted_one(shards, tmp_path):
    cfg = tiny_config()
    whole: dict[int, float] = {}
    train(
        cfg,
        shards,
        reporter=LocalReporter(tmp_path / "whole"),
        hooks=[lambda e: whole.update({e.step: e.losses["loss"]})],
    )

    def stop_at_2(event: StepEvent) -> None:
        if event.step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, shards, reporter=LocalReporter(tmp_path / "split"), hooks=[stop_at_2])
    reporter = LocalReporter(tmp_path / "split")
    assert [p.name for p in reporter.checkpoints()] == [checkpoint_name(1)]

    resumed: dict[int, float] = {}
    metrics = train(
        cfg, shards, reporter=reporter, hooks=[lambda e: resumed.update({e.step: e.losses["loss"]})]
    )
    assert list(resumed) == [2] and metrics["step"] == 2
    assert resumed[2] == whole[2]  # same batches, same random draws, same optimizer state: bit-identical
    final_whole = torch.load(tmp_path / "whole" / checkpoint_name(2) / "model.pt")
    final_split = torch.load(tmp_path / "split" / checkpoint_name(2) / "model.pt")
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


def test_rank_0_writes_a_progress_line_per_log_interval(shards, tmp_path, caplog):
    from magnet.progress import LOGGER

    caplog.set_level(logging.INFO, logger=LOGGER.name)
    train(tiny_config("train.log_every=1"), shards, reporter=LocalReporter(tmp_path))
    lines = [record.getMessage() for record in caplog.records if record.name == LOGGER.name]
    assert [line.split(":")[0] for line in lines] == ["step 1/2 (50%)", "step 2/2 (100%)"]
    assert re.fullmatch(r"step 1/2 \(50%\): loss \d+\.\d{4}, \d+\.\d samples/s, \d+s left", lines[0])
    assert lines[1].endswith(", 0s left")


def test_init_from_starts_a_run_from_a_checkpoints_weights(shards, tmp_path):
    """Fine-tuning: weights come from the checkpoint (training-only heads may be absent, as in an
    imported published model), while optimizer and schedule start fresh."""
    from magnet.models import build_model

    source = build_model(tiny_config().model)
    with torch.no_grad():
        source.classifier.predictor.query_feat.weight.fill_(0.25)
    start = tmp_path / "start"
    start.mkdir()
    torch.save(source.inference_state_dict(), start / "model.pt")

    seen: list[int] = []
    cfg = tiny_config("train.max_steps=1", f"train.init_from={start}", "train.lr=1e-12")
    train(cfg, shards, reporter=LocalReporter(tmp_path / "run"), hooks=[lambda e: seen.append(e.step)])
    trained = torch.load(tmp_path / "run" / checkpoint_name(1) / "model.pt")
    assert seen == [1]
    torch.testing.assert_close(trained["classifier.predictor.query_feat.weight"], torch.full((1, 64), 0.25))
    assert any(key.startswith("criterion.") for key in trained)  # the heads were built fresh


def test_init_from_refuses_weights_of_another_architecture(tmp_path):
    from magnet.checkpoint import load_initial_weights
    from magnet.models import build_model

    model = build_model(tiny_config().model)
    weights = model.inference_state_dict()
    weights["classifier.predictor.query_feat.weight"] = torch.zeros(1, 32)
    del weights["image_model.norm0.weight"]
    (tmp_path / "model.pt").write_bytes(b"")
    torch.save(weights, tmp_path / "model.pt")
    with pytest.raises(
        ValueError,
        match=r"misshapen: classifier\.predictor\.query_feat\.weight.*missing: image_model\.norm0\.weight",
    ):
        load_initial_weights(model, tmp_path)


def test_a_killed_workers_staged_checkpoint_is_removed_and_a_live_ones_kept(tmp_path):
    """Rank 0 dies inside its checkpoint's staging (os._exit: no cleanup runs), as a preempted or
    OOM-killed worker does; what it left is removed, a live process's staging is not."""
    script = textwrap.dedent(
        """
        import os, torch
        from magnet.checkpoint import TrainState
        from magnet.config import load_config
        from magnet.train import _step_checkpoint
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with _step_checkpoint(
            rank=0, model=model, optimizer=optimizer, scheduler=scheduler, state=TrainState(step=7),
            cfg=load_config("tiny"),
        ) as staged:
            print(staged, flush=True)
            os._exit(9)
        """
    )
    killed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    staged = Path(killed.stdout.strip())
    assert killed.returncode == 9 and (staged / "model.pt").is_file(), killed.stderr[-2000:]
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-live"
    unnamed = tmp_path / f"{STAGING_PREFIX}abcdefgh"
    live.mkdir(), unnamed.mkdir()

    assert remove_orphaned_staging(tmp_path) == [staged.parent]
    assert not staged.parent.exists() and live.is_dir() and unnamed.is_dir()


def test_a_checkpoint_fetched_from_a_url_lasts_as_long_as_its_context(tmp_path, monkeypatch):
    """Training flows evaluate and register from local_checkpoint: a URL's copy goes when they are
    done, and a local path makes no temporary directory at all."""
    from magnet.checkpoint import local_checkpoint

    stored = tmp_path / "store" / checkpoint_name(3)
    stored.mkdir(parents=True)
    (stored / "model.pt").write_bytes(b"weights")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    with local_checkpoint(str(stored)) as local:
        assert local == stored
    assert not any(scratch.iterdir())
    with local_checkpoint(stored.as_uri()) as local:  # file://..., fetched like s3://...
        assert (local / "model.pt").read_bytes() == b"weights" and local.is_relative_to(scratch)
    assert not any(scratch.iterdir())


def test_keep_freed_memory_stops_the_page_faults_of_reallocating_a_step() -> None:
    """A block freed and allocated again (every step's gradients) is reused, not mapped afresh."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from magnet.train import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):  # 64 MB, over glibc's largest mmap threshold
            torch.zeros(16 << 20)
        before = faults()
        for _ in range(10):
            torch.zeros(16 << 20)
        print(faults() - before)
        """
    )
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    pages = (64 << 20) // 4096
    assert faults["default"] > 8 * pages, faults  # every allocation faults its pages in again
    # reused: a few allocations' pages at most (a loaded machine's kernel may take some back;
    # the suite under load once measured 2 allocations' worth out of 5)
    assert faults["keep"] <= 3 * pages, faults


def test_each_part_gets_its_own_gradient_norm_and_they_add_up_to_the_global_one():
    """train/grad_norm/<part>: the vision and the text side apart, a part no loss reaches absent."""
    model = nn.Module()
    model.image_model = nn.Module()
    model.image_model.patch_embed = nn.Linear(1, 1, bias=False)  # vision
    model.language_model = nn.Module()
    model.language_model.pwams = nn.Linear(1, 1, bias=False)  # text_fusion
    model.classifier = nn.Linear(1, 1, bias=False)  # decoder: no gradient below
    nn.init.constant_(model.image_model.patch_embed.weight, 3.0)
    nn.init.constant_(model.language_model.pwams.weight, 4.0)
    x = torch.ones(1, 1)
    model.forward = lambda image, input_ids, attention_mask, target_mask: SimpleNamespace(
        losses={
            "loss": (model.image_model.patch_embed(x) ** 2 + model.language_model.pwams(x) ** 2).sum() / 2
        }
    )
    cfg = TrainConfig(lr=0.1, weight_decay=0.0, precision="fp32")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {k: torch.zeros(1, 1) for k in ("image", "mask", "input_ids", "attention_mask")}
    losses = train_step(
        model, [batch], optimizer, build_scheduler(optimizer, cfg, 10), cfg, torch.device("cpu")
    )
    assert losses["grad_norm/vision"] == pytest.approx(3.0) and losses[
        "grad_norm/text_fusion"
    ] == pytest.approx(4.0)
    assert "grad_norm/decoder" not in losses and losses["grad_norm"] == pytest.approx(5.0)
