"""CP / Tucker-2 conv replacements, rank helpers, EVBMF and the decomposition cache."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import tensorly as tl
import torch
from slimsearch.core.decompose import (
    DecompositionCache,
    DecompositionError,
    choose_rank,
    cp_degeneracy,
    cp_layers,
    cp_param_cap,
    decompose_conv,
    decomposed_params,
    default_cache,
    evbmf,
    evbmf_ranks,
    full_ranks,
    layer_structure,
    ranks_from_ratio,
    tucker2_layers,
)
from slimsearch.core.errors import SlimError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def make_conv(t: int = 16, s: int = 8, k: int | tuple[int, int] = 3, *, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(s, t, k, **kw).double()


def set_weight(conv: nn.Conv2d, w: torch.Tensor) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def kernel_of(seq: nn.Sequential) -> torch.Tensor:
    """The T×S×kh×kw kernel the replacement's weights represent (built from the weights, not forward)."""
    ws = [m.weight.detach() for m in seq]
    if len(ws) == 4:  # CP: (R,S,1,1) (R,1,kh,1) (R,1,1,kw) (T,R,1,1)
        b, c, d, a = ws[0][:, :, 0, 0], ws[1][:, 0, :, 0], ws[2][:, 0, 0, :], ws[3][:, :, 0, 0]
        return torch.einsum("tr,rs,ri,rj->tsij", a, b, c, d)
    u_in, core, u_out = ws[0][:, :, 0, 0], ws[1], ws[2][:, :, 0, 0]
    return torch.einsum("to,oiab,is->tsab", u_out, core, u_in)


def kernel_err(conv: nn.Conv2d, seq: nn.Sequential) -> float:
    return float(torch.linalg.norm(kernel_of(seq) - conv.weight.detach()) / torch.linalg.norm(conv.weight.detach()))


def low_rank_kernel(t: int, s: int, k: int, r: int, *, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """An exactly rank-r CP kernel (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, r, generator=g, dtype=torch.float64) for n in (t, s, k, k))
    w = torch.einsum("tr,sr,ir,jr->tsij", a, b, c, d)
    return w + noise * w.std() * torch.randn(w.shape, generator=g, dtype=torch.float64)


CONFIGS = [
    dict(padding=1),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(padding="same", dilation=2),
    dict(padding=0, bias=False),
    dict(padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_full_rank_tucker_reproduces_the_conv(kw: dict) -> None:
    conv = make_conv(**kw)
    seq = tucker2_layers(conv, (8, 16))
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    assert seq(x).shape == conv(x).shape
    assert rel_err(seq(x), conv(x)) < 1e-4
    assert all(type(m) is nn.Conv2d for m in seq)


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_cp_recovers_an_exact_low_rank_kernel(kw: dict) -> None:
    conv = set_weight(make_conv(**kw), low_rank_kernel(16, 8, 3, 4, seed=1))
    seq = cp_layers(conv, 4)
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    assert seq(x).shape == conv(x).shape
    assert rel_err(seq(x), conv(x)) < 1e-3
    assert [m.groups for m in seq] == [1, 4, 4, 1]


def test_non_square_kernel_and_tall_unfolding() -> None:
    conv = make_conv(64, 3, (3, 5), padding=(1, 2), stride=2)  # mode-0 unfolding 64×45 is tall
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    assert rel_err(tucker2_layers(conv, (3, 64))(x), conv(x)) < 1e-4
    cp = cp_layers(conv, 4)
    assert cp(x).shape == conv(x).shape
    assert cp[1].kernel_size == (3, 1) and cp[2].kernel_size == (1, 5)


def test_tucker_error_decreases_with_rank() -> None:
    conv = set_weight(make_conv(), low_rank_kernel(16, 8, 3, 6, seed=2, noise=0.3))
    errs = [kernel_err(conv, tucker2_layers(conv, (r, 2 * r))) for r in (1, 2, 3, 4, 6, 8)]
    assert all(b <= a + 1e-9 for a, b in pairwise(errs)), errs
    assert errs[-1] < 1e-9 and errs[0] > 0.3


def cp_factors(seq: nn.Sequential) -> list[np.ndarray]:
    r = seq[0].out_channels
    cols = [seq[3].weight.reshape(-1, r)] + [seq[i].weight.reshape(r, -1).T for i in (0, 1, 2)]
    return [c.detach().double().numpy() for c in cols]


def test_cp_degeneracy_is_one_for_a_rank_one_kernel() -> None:
    conv = set_weight(make_conv(), low_rank_kernel(16, 8, 3, 1, seed=4))
    seq = cp_layers(conv, 1)
    assert cp_degeneracy(cp_factors(seq), float(conv.weight.detach().norm())) == pytest.approx(1.0, rel=1e-6)


def test_cp_factors_of_a_noisy_kernel_are_not_degenerate() -> None:
    """Plain ALS at half the parameter cap of a random kernel returns large cancelling components; the
    default redoes it with the ridge term: bounded components, the same fit, and a layer SGD can train
    (one step at the same lr moves the plain factors' output ~500x more)."""
    conv = make_conv(16, 8, padding=1)
    norm = float(conv.weight.detach().norm())
    plain, default = cp_layers(conv, 19, l2_reg=0.0), cp_layers(conv, 19)
    assert cp_degeneracy(cp_factors(plain), norm) > 30
    assert cp_degeneracy(cp_factors(default), norm) < 10
    assert kernel_err(conv, default) < kernel_err(conv, plain) + 0.02
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = conv(x).detach() + 0.1 * torch.randn(conv(x).shape, dtype=torch.float64)
    moved = []
    for seq in (plain, default):
        before = seq(x).detach()
        ((seq(x) - target) ** 2).mean().backward()
        with torch.no_grad():
            for p in seq.parameters():
                p -= 0.01 * p.grad
        moved.append(rel_err(seq(x).detach(), before))
    assert moved[0] > 20 * moved[1], moved


def test_cp_error_decreases_with_rank() -> None:
    conv = set_weight(make_conv(), low_rank_kernel(16, 8, 3, 12, seed=3, noise=0.1))
    errs = [kernel_err(conv, cp_layers(conv, r)) for r in (1, 2, 4, 8, 12, 24)]
    assert all(b <= a + 0.02 for a, b in pairwise(errs)), errs  # ALS: roughly monotone
    assert errs[0] > 0.5 and errs[-1] < 0.12, errs


def test_kernel_layout_matches_forward() -> None:
    """kernel_of (used for the error tests) agrees with what the layers compute."""
    conv = make_conv(padding=1)
    for seq in (cp_layers(conv, 7), tucker2_layers(conv, (3, 5))):
        ref = nn.Conv2d(8, 16, 3, padding=1).double()
        set_weight(ref, kernel_of(seq))
        with torch.no_grad():
            ref.bias.copy_(conv.bias)
        x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
        assert rel_err(seq(x), ref(x)) < 1e-10


def test_bias_preserved_or_absent() -> None:
    conv = make_conv(padding=1)
    for seq in (cp_layers(conv, 3), tucker2_layers(conv, (2, 2))):
        assert torch.equal(seq[-1].bias, conv.bias)
        assert all(m.bias is None for m in seq[:-1])
    conv = make_conv(bias=False)
    assert all(m.bias is None for m in decompose_conv(conv, "cp", 3))
    assert all(m.bias is None for m in decompose_conv(conv, "tucker", (2, 2)))


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_params_formula(bias: bool) -> None:
    conv = make_conv(16, 8, (3, 5), bias=bias)
    t, s, kh, kw, b = 16, 8, 3, 5, 16 * bias
    for r in (1, 5, 20):
        seq = decompose_conv(conv, "cp", r)
        assert _count_params(seq) == decomposed_params(conv, "cp", r) == r * (s + kh + kw + t) + b
    for r3, r4 in ((1, 1), (3, 7), (8, 16)):
        seq = decompose_conv(conv, "tucker", (r3, r4))
        assert (
            _count_params(seq) == decomposed_params(conv, "tucker", (r3, r4)) == s * r3 + r3 * r4 * kh * kw + r4 * t + b
        )
    assert _count_params(layer_structure(conv, "cp", 5)) == decomposed_params(conv, "cp", 5)


def _macs(m: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        m(x)
    return fc.get_total_flops() // 2


def test_replacement_runs_fewer_macs_at_low_rank() -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1, stride=2, bias=False)
    x = torch.randn(1, 64, 16, 16)
    base = _macs(conv, x)
    assert base == 64 * 64 * 9 * 8 * 8
    cp = decompose_conv(conv, "cp", 16)
    # 1×1 at 16×16; kh×1 stride (2,1) -> 8×16; 1×kw stride (1,2) -> 8×8; 1×1 at 8×8
    assert _macs(cp, x) == 16 * 16 * 64 * 16 + 8 * 16 * 16 * 3 + 8 * 8 * 16 * 3 + 8 * 8 * 16 * 64 < base
    tk = decompose_conv(conv, "tucker", (16, 16))
    assert _macs(tk, x) == 16 * 16 * 64 * 16 + 8 * 8 * 16 * 16 * 9 + 8 * 8 * 16 * 64 < base


def test_replacement_exports_and_keeps_dtype() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)  # float32
    seq = decompose_conv(conv, "cp", 6)
    assert all(p.dtype == torch.float32 for p in seq.parameters())
    x = torch.randn(1, 8, 7, 7)
    exported = torch.export.export(seq, (x,))
    assert torch.allclose(exported.module()(x), seq(x))


def test_tensorly_backend_is_left_alone() -> None:
    before, tenalg_before = tl.get_backend(), tl.tenalg.get_backend()
    with tl.backend_context("pytorch"):
        tucker2_layers(make_conv(), (3, 3))
        cp_layers(make_conv(), 3)
        assert tl.get_backend() == "pytorch"
    assert tl.get_backend() == before and tl.tenalg.get_backend() == tenalg_before


# ---------------------------------------------------------------- errors and ranks


def test_nan_weight_raises_decomposition_error_with_layer_name() -> None:
    conv = make_conv()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    for method, rank in (("cp", 3), ("tucker", (2, 2))):
        with pytest.raises(DecompositionError, match="layer1.conv2.*NaN"):
            decompose_conv(conv, method, rank, layer_name="layer1.conv2")
    assert issubclass(DecompositionError, SlimError)


def test_bad_inputs_raise() -> None:
    conv = make_conv()
    with pytest.raises(DecompositionError, match="grouped"):
        decompose_conv(nn.Conv2d(8, 16, 3, groups=2), "cp", 3)
    with pytest.raises(DecompositionError, match="outside"):
        decompose_conv(conv, "tucker", (9, 4))
    with pytest.raises(DecompositionError, match="outside"):
        decompose_conv(conv, "cp", full_ranks(conv)["cp"] + 1)
    with pytest.raises(DecompositionError, match="one integer"):
        decompose_conv(conv, "cp", (3, 3))
    with pytest.raises(DecompositionError, match="unknown decomposition"):
        decompose_conv(conv, "svd", 3)


def test_zero_kernel_gives_bias_only() -> None:
    conv = set_weight(make_conv(padding=1), torch.zeros(16, 8, 3, 3, dtype=torch.float64))
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    for seq in (cp_layers(conv, 3), tucker2_layers(conv, (2, 3))):
        assert torch.allclose(seq(x), conv(x))


def test_full_ranks_and_ratio_bounds() -> None:
    conv = make_conv(16, 8, 3)
    cap = cp_param_cap(conv)
    assert full_ranks(conv) == {"cp": 72, "cp_cap": cap, "tucker": (8, 16)}
    assert cap == 16 * 8 * 9 // (16 + 8 + 3 + 3)
    assert decomposed_params(conv, "cp", cap) - 16 <= 16 * 8 * 9 < decomposed_params(conv, "cp", cap + 1) - 16
    assert ranks_from_ratio(conv, "cp", 1.0) == cap
    assert ranks_from_ratio(conv, "cp", 0.5) == round(0.5 * cap)
    assert ranks_from_ratio(conv, "cp", 1e-6) == 1
    assert ranks_from_ratio(conv, "tucker", 1.0) == (8, 16)
    assert ranks_from_ratio(conv, "tucker", 0.5) == (4, 8)
    assert ranks_from_ratio(conv, "tucker", 1e-6) == (1, 1)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(DecompositionError, match="rank_ratio"):
            ranks_from_ratio(conv, "cp", bad)


def test_choose_rank_precedence() -> None:
    conv = make_conv()
    assert choose_rank(conv, "cp", 5, 0.9) == 5
    assert choose_rank(conv, "tucker", [2, 3], 0.9) == (2, 3)
    assert choose_rank(conv, "tucker", None, 0.5) == (4, 8)
    assert choose_rank(conv, "tucker") == evbmf_ranks(conv, "tucker")
    with pytest.raises(DecompositionError, match="conv3"):
        choose_rank(conv, "tucker", (20, 3), layer_name="conv3")


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (30, 30)])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_evbmf_finds_the_rank_under_small_noise(shape: tuple[int, int], r: int) -> None:
    rng = np.random.default_rng(r)
    m = rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1]))
    m += 0.01 * m.std() * rng.standard_normal(shape)
    assert evbmf(m) == r


def test_evbmf_degenerate_inputs() -> None:
    assert evbmf(np.zeros((5, 7))) == 0
    assert evbmf(np.random.default_rng(0).standard_normal((50, 80))) <= 2  # pure noise
    exact = np.outer(np.arange(1.0, 6.0), np.arange(1.0, 8.0))  # exactly rank 1, zero singular values
    assert evbmf(exact) == 1
    with pytest.raises(ValueError):
        evbmf(np.ones(3))


def test_evbmf_ranks_orientation() -> None:
    """A kernel with Tucker ranks (R_in=3, R_out=5) gives (3, 5); CP takes the larger, capped."""
    g = torch.Generator().manual_seed(0)
    core = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    u_out, u_in = (
        torch.randn(32, 5, generator=g, dtype=torch.float64),
        torch.randn(24, 3, generator=g, dtype=torch.float64),
    )
    w = torch.einsum("to,oiab,si->tsab", u_out, core, u_in)
    w += 0.01 * w.std() * torch.randn(w.shape, generator=g, dtype=torch.float64)
    conv = set_weight(make_conv(32, 24, 3), w)
    assert evbmf_ranks(conv, "tucker") == (3, 5)
    assert evbmf_ranks(conv, "cp") == 5
    assert choose_rank(conv, "cp") == 5


# ---------------------------------------------------------------- cache


def test_cache_second_call_computes_nothing(tmp_path: Path) -> None:
    cache = DecompositionCache(tmp_path)
    conv = make_conv(padding=1)
    a = decompose_conv(conv, "cp", 5, cache=cache)
    b = decompose_conv(conv, "cp", 5, cache=cache)
    assert (cache.computed, cache.hits_memory, cache.hits_disk) == (1, 1, 0)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    assert torch.equal(a(x), b(x)) and a is not b
    with torch.no_grad():  # fine-tuning a returned module must not alter the cache
        b[0].weight.zero_()
    assert torch.equal(decompose_conv(conv, "cp", 5, cache=cache)(x), a(x))
    decompose_conv(conv, "cp", 6, cache=cache)  # another rank is another entry
    decompose_conv(conv, "tucker", (2, 2), cache=cache)
    assert cache.computed == 3


def test_cache_key_follows_weight_content(tmp_path: Path) -> None:
    cache = DecompositionCache(tmp_path)
    conv = make_conv()
    decompose_conv(conv, "tucker", (2, 2), cache=cache)
    decompose_conv(make_conv(), "tucker", (2, 2), cache=cache)  # same content, other module
    assert cache.computed == 1
    with torch.no_grad():
        conv.weight[0].zero_()  # e.g. pruned/fine-tuned
    decompose_conv(conv, "tucker", (2, 2), cache=cache)
    decompose_conv(make_conv(), "tucker", (2, 2), cache=cache, seed=1)
    assert cache.computed == 3


def test_disk_cache_survives_a_new_instance(tmp_path: Path) -> None:
    conv = make_conv(stride=2, padding=1)
    first = decompose_conv(conv, "cp", 4, cache=DecompositionCache(tmp_path))
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))
    again = DecompositionCache(tmp_path)
    second = decompose_conv(conv, "cp", 4, cache=again)
    assert (again.computed, again.hits_disk, again.hits_memory) == (0, 1, 0)
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    assert torch.equal(first(x), second(x))
    decompose_conv(conv, "cp", 4, cache=again)
    assert again.hits_memory == 1


@pytest.mark.parametrize("garbage", [b"", b"not a torch file", None])
def test_corrupt_cache_file_is_recomputed(tmp_path: Path, garbage: bytes | None) -> None:
    conv = make_conv()
    decompose_conv(conv, "tucker", (3, 4), cache=DecompositionCache(tmp_path))
    (path,) = tmp_path.glob("*.pt")
    if garbage is None:  # a valid torch file with the wrong shapes inside
        torch.save({"format": "x", "key": path.stem, "state": {"0.weight": torch.zeros(1)}}, path)
    else:
        path.write_bytes(garbage)
    cache = DecompositionCache(tmp_path)
    seq = decompose_conv(conv, "tucker", (3, 4), cache=cache)
    assert (cache.computed, cache.hits_disk) == (1, 0)
    assert kernel_err(conv, seq) < 1.0
    fresh = DecompositionCache(tmp_path)  # the file was rewritten
    decompose_conv(conv, "tucker", (3, 4), cache=fresh)
    assert fresh.hits_disk == 1


def test_memory_only_cache_and_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = DecompositionCache()
    decompose_conv(make_conv(), "cp", 2, cache=mem)
    decompose_conv(make_conv(), "cp", 2, cache=mem)
    assert (mem.computed, mem.hits_memory) == (1, 1) and mem.path("k") is None
    monkeypatch.setenv("SLIMSEARCH_CACHE", str(tmp_path / "c"))
    cache = default_cache()
    assert cache is default_cache() and cache.directory == tmp_path / "c" / "decompositions"
    decompose_conv(make_conv(), "cp", 2, cache=cache)
    assert len(list(cache.directory.glob("*.pt"))) == 1


def test_cp_layers_rank_is_math_consistent() -> None:
    """CP rank R needs R·(S+kh+kw+T) params; the cap is where that meets the original count."""
    conv = make_conv(64, 64, 3)
    assert cp_param_cap(conv) == math.floor(64 * 64 * 9 / (64 + 64 + 6))


def test_diverged_cp_raises_decomposition_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimsearch.core.decompose as dec

    def nan_parafac(w, rank, **kw):  # stands in for an ALS run that blew up
        factors = [np.full((n, rank), np.nan) for n in w.shape]
        return tl.cp_tensor.CPTensor((np.ones(rank), factors)), [float("nan")]

    monkeypatch.setattr(dec, "parafac", nan_parafac)
    with pytest.raises(DecompositionError, match="layer 'features.3'.*did not converge"):
        decompose_conv(make_conv(), "cp", 3, layer_name="features.3", cache=DecompositionCache())
