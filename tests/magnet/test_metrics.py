import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magnet.metrics import (
    IoUAccumulator,
    intersection_union,
    intersection_union_per_size,
    iou,
    predict_masks,
)


def logits_of(mask: torch.Tensor) -> torch.Tensor:
    """[B,H,W] {0,1} -> [B,1,H,W] logits that predict exactly that mask."""
    return (mask.float() * 20 - 10)[:, None]


def test_intersection_union_counts_pixels():
    pred = torch.zeros(1, 4, 4)
    pred[0, :2, :2] = 1  # 4 pixels
    gt = torch.zeros(1, 4, 4)
    gt[0, 1:3, 1:3] = 1  # 4 pixels, 1 shared
    inter, union = intersection_union(logits_of(pred), gt)
    assert inter.tolist() == [1.0] and union.tolist() == [7.0]


def test_empty_union_scores_zero():
    empty = torch.zeros(2, 3, 3)
    inter, union = intersection_union(logits_of(empty), empty)
    assert union.tolist() == [0.0, 0.0]
    assert iou(inter, union).tolist() == [0.0, 0.0]
    acc = IoUAccumulator()
    acc.update(inter, union)
    assert acc.compute()["mIoU"] == 0.0 and acc.compute()["oIoU"] == 0.0


def test_threshold_is_strict_on_probability():
    logits = torch.zeros(1, 1, 2, 2)  # probability exactly 0.5 -> background
    assert not predict_masks(logits, (2, 2), 0.5).any()
    assert predict_masks(logits + 1e-3, (2, 2), 0.5).all()


def test_logits_are_upsampled_bilinearly_to_the_target():
    logits = torch.tensor([[[[-10.0, 10.0]]]])  # [1,1,1,2]
    pred = predict_masks(logits, (1, 8))
    assert pred[0, 0].tolist() == [False] * 4 + [True] * 4


def test_precision_thresholds_are_inclusive():
    acc = IoUAccumulator()
    # IoU exactly 0.5, 0.9 and 0.89
    acc.update(torch.tensor([1.0, 9.0, 89.0]), torch.tensor([2.0, 10.0, 100.0]))
    m = acc.compute()
    assert m["P@0.5"] == pytest.approx(100.0)
    assert m["P@0.9"] == pytest.approx(100.0 / 3)
    assert m["P@0.8"] == pytest.approx(200.0 / 3)
    assert m["n"] == 3


def test_overall_and_mean_iou_differ_as_expected():
    acc = IoUAccumulator()
    # a big object scored well and a small one missed: oIoU weights by area, mIoU by sample
    acc.update(torch.tensor([90.0, 0.0]), torch.tensor([100.0, 10.0]))
    m = acc.compute()
    assert m["oIoU"] == pytest.approx(100 * 90 / 110)
    assert m["mIoU"] == pytest.approx(45.0)


def test_original_size_protocol_scores_each_sample_at_its_own_size():
    logits = torch.full((2, 1, 2, 2), 10.0)
    targets = [torch.ones(3, 5, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8)]
    inter, union = intersection_union_per_size(logits, targets)
    assert inter.tolist() == [15.0, 0.0] and union.tolist() == [15.0, 16.0]


def test_merged_accumulators_equal_one_over_all_samples():
    torch.manual_seed(0)
    inter = torch.randint(0, 50, (10,)).double()
    union = inter + torch.randint(0, 50, (10,)).double()
    whole, a, b = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    whole.update(inter, union)
    a.update(inter[:3], union[:3])
    b.update(inter[3:], union[3:])
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[B,1,h,w\]"):
        predict_masks(torch.zeros(1, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="no samples"):
        IoUAccumulator().compute()


def _all_reduce_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    acc = IoUAccumulator()
    if rank == 0:
        acc.update(torch.tensor([1.0, 9.0]), torch.tensor([2.0, 10.0]))
    else:
        acc.update(torch.tensor([0.0]), torch.tensor([5.0]))
    acc.all_reduce()
    if rank == 0:
        torch.save(acc.compute(), result_file)
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    result_file = tmp_path / "result.pt"
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=2)
    reduced = torch.load(result_file)
    single = IoUAccumulator()
    single.update(torch.tensor([1.0, 9.0, 0.0]), torch.tensor([2.0, 10.0, 5.0]))
    assert reduced == pytest.approx(single.compute())
