import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magnet.metrics import (
    TEXT_GROUPS,
    GroupScores,
    IoUAccumulator,
    intersection_union,
    intersection_union_per_size,
    iou,
    pick_outcomes,
    picks_referred,
    predict_masks,
    text_groups,
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


def test_align_corners_moves_the_boundary_as_worked_out_by_hand():
    # Logits [-3, 1] along x, upsampled to 8 columns; foreground where the logit > 0.
    # align_corners=True: x_in = x_out / 7, logit -3 + 4 x_out / 7 > 0 from x_out = 6;
    # align_corners=False: x_in = (x_out + 0.5) / 4 - 0.5, logit x_out - 4.5 > 0 from x_out = 5.
    logits = torch.tensor([[[[-3.0, 1.0]]]])  # [1,1,1,2]
    assert predict_masks(logits, (1, 8), align_corners=True)[0, 0].tolist() == [False] * 6 + [True] * 2
    assert predict_masks(logits, (1, 8), align_corners=False)[0, 0].tolist() == [False] * 5 + [True] * 3


def test_a_448_model_scored_as_the_reference_does():
    # A 448 model's logits are 112 wide: the left 28 columns foreground, the ground truth the left
    # quarter of 448. With align_corners=True the step at x_in = 27.5 lands at
    # x_out = 27.5 * 447 / 111 = 110.7, so 111 columns are foreground; without, at
    # (27.5 + 0.5) * 4 - 0.5 = 111.5, so 112 columns.
    logits = torch.full((1, 1, 112, 112), -10.0)
    logits[..., :28] = 10.0
    gt = torch.zeros(1, 448, 448)
    gt[..., :112] = 1
    inter, union = intersection_union(logits, gt, align_corners=True)
    assert inter.tolist() == [111.0 * 448] and union.tolist() == [112.0 * 448]
    inter, union = intersection_union(logits, gt, align_corners=False)
    assert inter.tolist() == union.tolist() == [112.0 * 448]
    inter, union = intersection_union_per_size(logits, [gt[0]], align_corners=True)
    assert inter.tolist() == [111.0 * 448]


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


def test_group_scores_count_each_sample_in_its_groups():
    scores = GroupScores(["kind/a", "kind/b", "kind/empty"])
    # IoU 1/2 (a), 9/10 (a and b), 0/5 (no group)
    scores.update(
        torch.tensor([1.0, 9.0, 0.0]), torch.tensor([2.0, 10.0, 5.0]), [["kind/a"], ["kind/a", "kind/b"], []]
    )
    got = scores.compute()
    assert list(got) == ["kind/a", "kind/b"]  # a group without samples is not reported
    assert got["kind/a"] == pytest.approx({"oIoU": 100 * 10 / 12, "mIoU": 100 * (0.5 + 0.9) / 2, "n": 2})
    assert got["kind/b"] == pytest.approx({"oIoU": 90.0, "mIoU": 90.0, "n": 1})
    with pytest.raises(ValueError, match="2 samples for 3"):
        scores.update(torch.zeros(3), torch.ones(3), [[], []])


def _box(rows: slice, cols: slice, size: int = 12) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[rows, cols] = 1
    return mask


# A hand-made scene of 12x12: the referred 2x2 object, a 4x4 neighbour beside it, and a 10x10
# object (the big neighbour) just below both.
TARGET = _box(slice(0, 2), slice(0, 2))
NEIGHBOUR = _box(slice(0, 4), slice(4, 8))
BIG = _box(slice(2, 12), slice(0, 10))


@pytest.mark.parametrize(
    ("case", "pred", "others", "picked"),
    [
        ("right object, poor mask", _box(slice(0, 1), slice(0, 1)), [NEIGHBOUR, BIG], True),
        ("wrong object", NEIGHBOUR.clone(), [NEIGHBOUR, BIG], False),
        # IoU 4/10 with the target, 6/104 with the big neighbour: its larger intersection does not count
        ("big neighbour merely touched", _box(slice(0, 5), slice(0, 2)), [BIG], True),
        # half of the target and half of an equal copy beside it: IoU 1/3 with each
        ("tie", _box(slice(0, 2), slice(1, 3)), [_box(slice(0, 2), slice(2, 4))], False),
        ("empty prediction", torch.zeros(12, 12, dtype=torch.uint8), [NEIGHBOUR], False),
        ("empty prediction, lone object", torch.zeros(12, 12, dtype=torch.uint8), [], False),
        ("lone object hit", TARGET.clone(), [], True),
    ],
)
def test_a_prediction_picks_the_object_it_overlaps_best(case, pred, others, picked):
    stacked = torch.stack(others) if others else torch.zeros(0, 12, 12, dtype=torch.uint8)
    assert picks_referred(pred.bool(), TARGET, stacked) is picked, case
    # the same through logits, at the target's own size (the original-size protocol)
    assert pick_outcomes(logits_of(pred[None]), [TARGET], [stacked]).tolist() == [picked], case


def test_pick_accuracy_and_outline_iou_of_picked_samples():
    # IoU 1/2 picked, 9/10 wrong object, 1/4 picked, 0 (empty prediction) not picked
    inter, union = torch.tensor([1.0, 9.0, 1.0, 0.0]), torch.tensor([2.0, 10.0, 4.0, 3.0])
    acc = IoUAccumulator()
    acc.update(inter, union, torch.tensor([True, False, True, False]))
    got = acc.compute()
    assert got["pick_acc"] == 50.0 and got["outline_IoU"] == pytest.approx(100 * (0.5 + 0.25) / 2)
    nothing_picked = IoUAccumulator()
    nothing_picked.update(inter, union, torch.zeros(4, dtype=torch.bool))
    assert nothing_picked.compute()["pick_acc"] == 0.0 and "outline_IoU" not in nothing_picked.compute()
    unknown = IoUAccumulator()  # shards without the images' objects: no pick metrics at all
    unknown.update(inter, union)
    assert not {"pick_acc", "outline_IoU"} & set(unknown.compute())
    groups = GroupScores(["kind/a", "kind/b"])
    groups.update(inter, union, [["kind/a"], ["kind/b"], ["kind/a"], ["kind/b"]], torch.tensor([1, 0, 1, 0]))
    assert groups.compute()["kind/a"] == pytest.approx(
        {"oIoU": 100 * 2 / 6, "mIoU": 37.5, "pick_acc": 100.0, "outline_IoU": 37.5, "n": 2}
    )
    assert groups.compute()["kind/b"] == pytest.approx(
        {"oIoU": 100 * 9 / 13, "mIoU": 45.0, "pick_acc": 0.0, "n": 2}
    )


@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("red", ("text/plain", "text/length_1-3")),
        ("guy in blue shirt", ("text/plain", "text/length_4-6")),
        ("man on the LEFT", ("text/spatial", "text/length_4-6")),
        ("the largest red shape", ("text/ordinal", "text/length_4-6")),
        ("2nd car from right", ("text/spatial", "text/ordinal", "text/length_4-6")),
        ("woman in a white coat holding an umbrella", ("text/plain", "text/length_7-10")),
        ("the tall man with a hat standing behind the woman in red", ("text/spatial", "text/length_11-plus")),
    ],
)
def test_text_groups_of_hand_made_expressions(text, groups):
    assert text_groups(text) == groups
    assert set(groups) <= set(TEXT_GROUPS)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[B,1,h,w\]"):
        predict_masks(torch.zeros(1, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="no samples"):
        IoUAccumulator().compute()


def _all_reduce_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    acc = IoUAccumulator()
    if rank == 0:
        acc.update(torch.tensor([1.0, 9.0]), torch.tensor([2.0, 10.0]), torch.tensor([True, True]))
    else:
        acc.update(torch.tensor([0.0]), torch.tensor([5.0]), torch.tensor([False]))
    groups = GroupScores(["kind/a", "kind/b"])  # rank 1 sees no sample of kind/a
    if rank == 0:
        groups.update(
            torch.tensor([1.0, 9.0]),
            torch.tensor([2.0, 10.0]),
            [["kind/a"], ["kind/b"]],
            torch.tensor([1, 1]),
        )
    else:
        groups.update(torch.tensor([0.0]), torch.tensor([5.0]), [["kind/b"]], torch.tensor([0]))
    acc.all_reduce()
    groups.all_reduce()
    if rank == 0:
        torch.save((acc.compute(), groups.compute()), result_file)
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    result_file = tmp_path / "result.pt"
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=2)
    reduced, reduced_groups = torch.load(result_file)
    single = IoUAccumulator()
    single.update(torch.tensor([1.0, 9.0, 0.0]), torch.tensor([2.0, 10.0, 5.0]), torch.tensor([1, 1, 0]))
    assert reduced == pytest.approx(single.compute())
    assert reduced["pick_acc"] == pytest.approx(200 / 3) and reduced["outline_IoU"] == pytest.approx(70.0)
    assert reduced_groups["kind/a"] == pytest.approx(
        {"oIoU": 50.0, "mIoU": 50.0, "pick_acc": 100.0, "outline_IoU": 50.0, "n": 1}
    )
    assert reduced_groups["kind/b"] == pytest.approx(
        {"oIoU": 60.0, "mIoU": 45.0, "pick_acc": 50.0, "outline_IoU": 90.0, "n": 2}
    )
