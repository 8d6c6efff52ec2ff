"""ITM hard-negative sampling: the Gumbel-max kernel against the reference's probabilities.

Statistical test: many identical rows give many independent draws from one distribution; a chi-square
goodness-of-fit test against softmax + eps with positives zeroed must not reject at p < 1e-4 (fixed seeds,
so the test is deterministic). Its power, computed for moving part of a 0.2-probability column's mass to a
0.1 column (10 degrees of freedom): 1,500 rows catch a 20% shift, 500 rows a 35% shift. The interpreter runs
one program per row (~10 ms each), so on CPU the Triton rows draw 500 times; that the kernel's draws are
exactly Gumbel-max over its own Philox stream is tested draw by draw below, at any size.
"""

import pytest
import torch
import triton
import triton.language as tl
from scipy.stats import chisquare

import fastblip.kernels.hard_negatives as hn
from fastblip.kernels import INTERPRET
from fastblip.ops import sample_hard_negatives, sample_hard_negatives_reference
from fastblip.ops.sampling import negative_weights

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_sampling_frequencies_match_weights(device, backend, eps):
    if backend == "triton":
        _skip_cpu_without_interpreter(device)
    R, C = (500 if backend == "triton" and device == "cpu" else 1500), 13
    g = torch.Generator().manual_seed(5)
    row_a = torch.randn(C, generator=g) * 1.5
    row_b = torch.randn(C, generator=g) * 1.5
    sim_i2t, sim_t2i = row_a.expand(R, C).to(device), row_b.expand(R, C).to(device)
    idx = torch.zeros(R, dtype=torch.long, device=device)
    idx_all = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7, 0, 8, 9, 10], device=device)
    neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, idx, idx_all, eps=eps,
                                             generator=_gen(device, 11), backend=backend)
    for draws, sim in ((neg_img, sim_t2i), (neg_txt, sim_i2t)):
        w = negative_weights(sim[:1], idx[:1], idx_all, eps)[0].cpu().double()
        p = w / w.sum()
        counts = torch.bincount(draws.cpu(), minlength=C).double()
        assert counts[p == 0].sum() == 0, "a positive (zero-weight) column was drawn"
        keep = p > 0
        res = chisquare(counts[keep].numpy(), (p[keep] * R).numpy())
        assert res.pvalue > 1e-4, f"chi-square rejects: p={res.pvalue:.2e}, counts {counts.tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_idx", [False, True])
def test_never_a_positive(device, use_idx):
    _skip_cpu_without_interpreter(device)
    B = 9
    C = 23 if use_idx else B
    g = torch.Generator().manual_seed(7)
    idx = idx_all = None
    if use_idx:
        idx = torch.randint(0, 5, (B,), generator=g).to(device)
        idx_all = torch.randint(0, 5, (C,), generator=g).to(device)
        idx_all[:B] = idx  # every row has at least its own column positive
    for seed in range(6):
        # make positives the most similar columns: the weights then push hardest towards them
        sim_i2t = torch.randn(B, C, generator=g).to(device) * 3
        sim_t2i = torch.randn(B, C, generator=g).to(device) * 3
        pos = (torch.eye(B, C, dtype=torch.bool, device=device) if idx is None
               else idx[:, None] == idx_all[None, :])
        sim_i2t, sim_t2i = sim_i2t + 20 * pos, sim_t2i + 20 * pos
        a, b = sample_hard_negatives(sim_i2t, sim_t2i, idx, idx_all, eps=1e-4, generator=_gen(device, seed),
                                     backend="triton")
        for draws in (a, b):
            assert draws.dtype == torch.int64 and draws.shape == (B,)
            assert ((draws >= 0) & (draws < C)).all()
            assert not pos[torch.arange(B, device=device), draws].any()


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_and_seed_dependent(device):
    _skip_cpu_without_interpreter(device)
    B = 40
    s1, s2 = torch.randn(B, B, device=device), torch.randn(B, B, device=device)
    a = sample_hard_negatives(s1, s2, generator=_gen(device, 3), backend="triton")
    b = sample_hard_negatives(s1, s2, generator=_gen(device, 3), backend="triton")
    c = sample_hard_negatives(s1, s2, generator=_gen(device, 4), backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_row_without_negative_returns_argmax(device, backend):
    """Documented fallback: every column positive -> the row's argmax column, no NaN, in range."""
    if backend == "triton":
        _skip_cpu_without_interpreter(device)
    B, C = 5, 7
    sim = torch.randn(B, C, device=device)
    idx = torch.tensor([0, 0, 1, 2, 0], device=device)
    idx_all = torch.zeros(C, dtype=torch.long, device=device)  # rows with id 0 have only positives
    a, b = sample_hard_negatives(sim, sim, idx, idx_all, eps=0.0, generator=_gen(device, 0), backend=backend)
    no_neg = idx == 0
    assert torch.equal(a[no_neg], sim.argmax(1)[no_neg]) and torch.equal(b[no_neg], sim.argmax(1)[no_neg])
    one = torch.randn(1, 1, device=device)  # B = 1 without ids: the only column is the diagonal
    a, b = sample_hard_negatives(one, one, generator=_gen(device, 0), backend=backend)
    assert a.tolist() == [0] and b.tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_similarities_no_nan(device):
    """eps = 0 with logits spread over 1e4: softmax underflows to 0 for most columns; those are never drawn
    (as with multinomial) and the draw stays in range."""
    _skip_cpu_without_interpreter(device)
    B = 6
    sim = torch.linspace(-5000, 5000, B * B, device=device).reshape(B, B)
    a, b = sample_hard_negatives(sim, sim, eps=0.0, generator=_gen(device, 1), backend="triton")
    ra, rb = sample_hard_negatives_reference(sim, sim, eps=0.0, generator=_gen(device, 1))
    # each row's largest off-diagonal column carries all the mass: both backends must pick it
    assert torch.equal(a, ra) and torch.equal(b, rb)


def test_bad_shapes():
    with pytest.raises(ValueError, match="C must equal B"):
        sample_hard_negatives(torch.randn(3, 5), torch.randn(3, 5), backend="triton")
    with pytest.raises(ValueError, match="both"):
        sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 4), backend="triton")


@triton.jit
def _philox_uniforms(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The kernel's uniforms: tl.rand(seed, flat index) for flat indices 0..n-1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(tl.load(seed_ptr), offs), mask=offs < n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C,use_idx", [(7, 1500, True), (33, 33, False), (3, 2049, True)])
def test_draw_is_gumbel_max_of_philox_stream(device, B, C, use_idx):
    """The reproducibility contract, exactly: the draw of row r in direction dr (0 = t2i, 1 = i2t) is
    argmax_j log w_j - log(-log u) with u = tl.rand(seed, (dr * B + r) * C + j), whatever the tiling
    (C = 1500 and 2049 take 2 and 3 column tiles). Recomputed in torch from the same uniforms; a tie within
    float rounding between the two best columns would make this flaky, which at these sizes has probability
    ~1e-5 per row (the gap between the two largest Gumbel scores is ~Exp(1)), and the seeds are fixed."""
    _skip_cpu_without_interpreter(device)
    g = torch.Generator().manual_seed(B * C)
    sim_i2t = (torch.randn(B, C, generator=g) * 2).to(device)
    sim_t2i = (torch.randn(B, C, generator=g) * 2).to(device)
    idx = idx_all = None
    if use_idx:
        idx = torch.randint(0, 50, (B,), generator=g).to(device)
        idx_all = torch.randint(0, 50, (C,), generator=g).to(device)
    seed = torch.tensor([987654321], device=device)
    got = hn.sample_forward(sim_i2t, sim_t2i, idx, idx_all, 1e-4, seed)
    u = torch.empty(2 * B * C, device=device)
    _philox_uniforms[(triton.cdiv(u.numel(), 1024),)](seed, u, u.numel(), BLOCK=1024)
    u = u.reshape(2, B, C).double().clamp(1e-12, 1 - 1e-7)
    for dr, sim in enumerate((sim_t2i, sim_i2t)):
        w = negative_weights(sim, idx, idx_all, 1e-4).double()
        score = torch.where(w > 0, w.clamp_min(1e-30).log() - (-u[dr].log()).log(), float("-inf"))
        assert torch.equal(got[dr].cpu(), score.argmax(1).cpu()), dr
