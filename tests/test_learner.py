"""The learner step: no gradient crosses a layer, emitted outputs are never changed, objectives behave."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.stage import partition
from workers.layers import ConvBlock, normalise, parse_blocks
from workers.learner import Learner, LearnerSpec, LearnerStack
from workers.objectives import OBJECTIVES, get_objective


def spec(objective: str = "nce", head: tuple[int, int] | None = (16, 8), layers: str = "conv:4,conv:6,mlp:8",
         seed: int = 0, delta: float = 0.1) -> LearnerSpec:
    blocks = parse_blocks(layers)
    return LearnerSpec(blocks, (1, 8, 8), objective, tuple(delta for _ in blocks), 1e-2, head,
                       tuple(1 for _ in blocks), seed)


def clips(b: int = 4, t: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, t, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_loss_of_a_layer_leaves_the_layers_below_without_gradient() -> None:
    below, above = Learner(spec(), 0, 1), Learner(spec(), 1, 2)
    x, _ = below.step(clips())
    below.optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in below.modules().parameters()]
    above.step(x)
    for p, q in zip(below.modules().parameters(), before, strict=True):
        assert p.grad is None, "a gradient crossed the layer boundary"
        assert torch.equal(p, q)
    assert all(p.grad is not None for p in above.modules().parameters())


def test_emitted_output_is_detached_and_unchanged_by_the_layer_above() -> None:
    below, above = Learner(spec(), 0, 1), Learner(spec(), 1, 2)
    x, _ = below.step(clips())
    assert not x.requires_grad and x.grad_fn is None
    emitted = x.clone()
    for _ in range(3):
        above.step(x)
    assert torch.equal(x, emitted)


def test_emitted_output_is_the_forward_before_the_step() -> None:
    learner = Learner(spec(), 0, 1)
    frames = clips()
    expected = learner.forward(frames.flatten(0, 1))[0]
    out, _ = learner.step(frames)
    assert torch.equal(out.flatten(0, 1), expected)
    assert not torch.equal(learner.forward(frames.flatten(0, 1))[0], expected), "the step changed nothing"


def test_output_is_normalised_to_unit_rms() -> None:
    out, _ = Learner(spec(), 0, 1).step(clips())
    rms = out.flatten(2).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    assert torch.allclose(normalise(3 * out.flatten(0, 1)), out.flatten(0, 1), atol=1e-4)


def test_other_normalisations_scale_per_location_or_not_at_all() -> None:
    y = torch.rand(5, 4, 3, 3) * torch.arange(1, 10.0).view(1, 1, 3, 3)  # locations of very different scale
    per_location = normalise(y, "channel").pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(per_location, torch.ones_like(per_location), atol=1e-3, rtol=0)
    assert torch.equal(normalise(y, "none"), y)
    with pytest.raises(ValueError, match="normalisation"):
        normalise(y, "batch")
    s = dataclasses.replace(spec(), norm="channel")
    out, _ = Learner(s, 0, 1).step(clips())
    per_location = out.pow(2).mean(dim=2).sqrt()
    torch.testing.assert_close(per_location, torch.ones_like(per_location), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm", ["rms", "channel", "none"])
def test_an_output_emitted_into_given_memory_is_the_same_bits_in_that_memory(norm: str) -> None:
    s = dataclasses.replace(spec(), norm=norm)
    plain, into = Learner(s, 0, 2), Learner(s, 0, 2)
    given: list[torch.Tensor] = []

    def memory(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        given.append(torch.full(shape, float("nan"), dtype=dtype))
        return given[-1]

    for seed in range(3):
        a, ma = plain.step(clips(seed=seed))
        b, mb = into.step(clips(seed=seed), memory)
        assert torch.equal(a, b) and ma == mb and not b.requires_grad
        assert b.data_ptr() == given[-1].data_ptr()  # the output is the memory given, filled
    for p, q in zip(plain.modules().parameters(), into.modules().parameters(), strict=True):
        assert torch.equal(p, q)
    # a stack writes only its top learner's output there
    stack = LearnerStack.layer_local(s, 0, 3)
    out, _ = stack.step(clips(), memory)
    assert out.data_ptr() == given[-1].data_ptr() and given[-1].shape == (12, 8)


@pytest.mark.gpu
def test_a_gpu_learner_emits_into_host_memory_with_one_copy_and_the_same_bits() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    plain, into = Learner(spec(), 0, 2, "cuda"), Learner(spec(), 0, 2, "cuda")
    host = torch.empty(0)

    def memory(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nonlocal host
        host = torch.empty(shape, dtype=dtype)  # host memory, as a shared-memory slot is
        return host

    a, _ = plain.step(clips().cuda())
    b, _ = into.step(clips().cuda(), memory)
    assert b.device.type == "cpu" and b.data_ptr() == host.data_ptr()
    assert torch.equal(a.cpu(), b)


def test_a_conv_block_computes_the_same_bits_from_either_layout() -> None:
    # Its weight is channels-last (workers/layers.py), what it is given may be either: a block's output in
    # the same process, or the default-layout copy a transport delivers. Both must be the same step.
    block = ConvBlock(6, 8)
    assert block.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(12, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    got = []
    for given in (x, x.contiguous(memory_format=torch.channels_last)):
        block.zero_grad(set_to_none=True)
        y = block(given)
        y.pow(2).sum().backward()
        got.append((y.detach(), block.conv.weight.grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def test_end_to_end_learner_trains_every_block() -> None:
    e2e = Learner(spec(), 0, 3)
    e2e.step(clips())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e2e.blocks.parameters())


def test_each_learner_pools_its_loss_on_its_own_grid() -> None:
    s = spec(head=None, layers="conv:4,conv:6")
    s = LearnerSpec(s.blocks, s.in_shape, s.objective, s.deltas, s.lr, s.head, (4, 2), s.seed)
    x = clips()
    seen = []
    for first, last in [(0, 1), (1, 2), (0, 2)]:  # the end-to-end learner pools like its top block
        learner = Learner(s, first, last)
        learner.objective = lambda e, delta, inner=learner.objective: seen.append(e.shape[-1]) or inner(e, delta)
        learner.step(x if first == 0 else Learner(s, 0, 1).step(x)[0])
    assert seen == [4 * 4 * 4, 6 * 2 * 2, 6 * 2 * 2]


def test_init_is_independent_of_stage_grouping() -> None:
    whole = LearnerStack.layer_local(spec(), 0, 3)
    parts = [LearnerStack.layer_local(spec(), a, b) for a, b in partition(3, 2)]
    split = [lrn for s in parts for lrn in s.learners]
    for a, b in zip(whole.learners, split, strict=True):
        for p, q in zip(a.modules().parameters(), b.modules().parameters(), strict=True):
            assert torch.equal(p, q)
    other = LearnerStack.layer_local(spec(seed=1), 0, 3)
    assert not torch.equal(other.learners[0].blocks[0].conv.weight, whole.learners[0].blocks[0].conv.weight)


def test_state_dict_round_trip_continues_identically() -> None:
    a = LearnerStack.layer_local(spec(), 0, 3)
    a.step(clips(seed=1))
    b = LearnerStack.layer_local(spec(), 0, 3)
    for la, lb in zip(a.learners, b.learners, strict=True):
        lb.load_state_dict(la.state_dict())
    xa, _ = a.step(clips(seed=2))
    xb, _ = b.step(clips(seed=2))
    assert torch.equal(xa, xb)


def test_partition_into_stages() -> None:
    assert partition(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert partition(3, 5) == [(0, 3)]
    with pytest.raises(ValueError, match="layers per stage"):
        partition(3, 0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_reports_its_parts_and_learns(name: str) -> None:
    learner = Learner(spec(objective=name, head=None, delta=0.0), 0, 1)  # delta 0: every pair is pulled
    losses = []
    frames = clips(b=6, t=4)
    for _ in range(15):
        _, m = learner.step(frames)
        losses.append(m["loss"])
        assert set(m) == {"loss", "pos", "neg", "over", "spread"}
        assert 0 <= m["pos"] <= 4 and 0 <= m["neg"] <= 4 and 0 <= m["over"] <= 1 and m["spread"] >= 0
    assert losses[-1] < losses[0], losses


def test_hinge_is_zero_when_every_pair_is_within_delta() -> None:
    e = torch.ones(3, 4, 5) + 1e-3 * torch.randn(3, 4, 5)
    result = get_objective("hinge")(e, 0.5)
    assert result.loss.item() == 0 and result.over == 0


def test_hinge_neg_pushes_identical_clips_apart() -> None:
    e = torch.ones(3, 4, 5)
    assert get_objective("hinge-neg")(e, 0.5).loss.item() == pytest.approx(1.0)


def test_spread_detects_collapse() -> None:
    healthy = get_objective("nce")(torch.randn(8, 4, 16), 0.1)
    collapsed = get_objective("nce")(torch.ones(8, 4, 16), 0.1)
    assert healthy.spread > 0.5 and collapsed.spread < 1e-3


def test_nce_prefers_the_true_next_frame() -> None:
    e = torch.randn(6, 4, 16)
    slow = e[:, :1].expand(-1, 4, -1) + 0.01 * torch.randn(6, 4, 16)
    assert get_objective("nce")(slow, 0.1).loss < get_objective("nce")(e, 0.1).loss


def test_bad_objective_input() -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        get_objective("nope")
    with pytest.raises(ValueError, match="T>=2"):
        get_objective("hinge")(torch.zeros(2, 1, 3), 0.1)
    with pytest.raises(ValueError, match="conv:32"):
        parse_blocks("conv:32,dense:3")
    with pytest.raises(ValueError, match="cannot follow"):
        parse_blocks("mlp:4,conv:3")
