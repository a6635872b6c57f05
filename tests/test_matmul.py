"""Float32 products through oneDNN (matmul.py): the same numbers as MKL's, chosen by the CPU."""

import pytest
import torch

from seq2seq import matmul
from seq2seq.model import ModelConfig, Seq2Seq

needs_onednn = pytest.mark.skipif(not matmul._onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setattr(matmul, "enabled", lambda: True)


@pytest.mark.parametrize("vendor,flags,setting,expected", [
    ("AuthenticAMD", {"avx2", "avx512f"}, "auto", True),     # MKL would run AVX2 kernels here
    ("AuthenticAMD", {"avx2"}, "auto", False),               # no AVX-512: nothing to gain
    ("GenuineIntel", {"avx2", "avx512f", "amx_bf16"}, "auto", False),  # MKL uses AVX-512 itself
    ("", set(), "auto", False),                              # no /proc/cpuinfo
    ("GenuineIntel", {"avx2"}, "onednn", True),
    ("AuthenticAMD", {"avx512f"}, "blas", False),
])
def test_the_cpu_decides_which_library_runs_float32_products(vendor, flags, setting, expected):
    assert matmul.choose(setting, vendor, flags, available=True) is expected
    assert matmul.choose(setting, vendor, flags, available=False) is False


def test_a_bad_setting_names_itself_and_the_choices():
    with pytest.raises(ValueError, match=r"SEQ2SEQ_FLOAT32_MATMUL='mkl'.*auto, onednn, blas"):
        matmul.choose("mkl", "AuthenticAMD", {"avx512f"}, available=True)


@needs_onednn
def test_onednn_products_equal_torch_mm(onednn):
    g = torch.Generator().manual_seed(0)
    a, w, c = (torch.randn(*s, generator=g) for s in ((37, 50), (23, 50), (37, 23)))
    b = torch.randn(37, 11, generator=g)
    strided_w = torch.randn(50, 23, generator=g).t()                      # (23, 50), not contiguous
    out = torch.empty(37, 23)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matmul.mm_t(a, w), a @ w.t(), **close)
    torch.testing.assert_close(matmul.mm_t(a, strided_w), a @ strided_w.t(), **close)
    assert matmul.mm_t(a, w, out=out) is out
    torch.testing.assert_close(out, a @ w.t(), **close)
    torch.testing.assert_close(matmul.addmm_t(c, a, w), c + a @ w.t(), **close)
    torch.testing.assert_close(matmul.addmm_t(c[0], a, w), c[0] + a @ w.t(), **close)
    torch.testing.assert_close(matmul.mm_tn(a, b), a.t() @ b, **close)
    m = torch.randn(50, 13, generator=g)
    torch.testing.assert_close(matmul.mm_t(a, matmul.transposed(m)), a @ m, **close)
    assert matmul.transposed(w).is_contiguous()
    with pytest.raises(RuntimeError, match=r"\(37x50 and 37x11\)"):   # torch.mm's message
        matmul.mm_t(a, b.t())


@pytest.mark.parametrize("route", [False, True])
def test_one_rule_says_where_onednn_multiplies(route, monkeypatch):
    # pad_rows (the output layer), here, and the decoder's row skipping (bptt.py; test_bptt.py's
    # test_rows_run_to_the_end_where_onednn_would_compile_a_kernel_per_row_count) follow it
    monkeypatch.setattr(matmul, "enabled", lambda: route)
    x = torch.zeros(13, 4)
    assert matmul.onednn_multiplies(x) is route and matmul.product_dtype(x) == torch.float32
    assert (matmul.pad_rows(x).size(0) == matmul.ROW_MULTIPLE) is route
    for dtype in (torch.bfloat16, torch.float16):
        assert matmul.onednn_multiplies(x.to(dtype)) and matmul.pad_rows(x.to(dtype)).size(0) == matmul.ROW_MULTIPLE
    assert not matmul.onednn_multiplies(x.double()) and matmul.pad_rows(x.double()).size(0) == 13
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul.product_dtype(x) == torch.bfloat16 and matmul.onednn_multiplies(x)
        assert matmul.product_dtype(x.double()) == torch.float64 and not matmul.onednn_multiplies(x.double())
    assert not matmul.onednn_multiplies(x.to_sparse())


@pytest.mark.parametrize("route", [False, pytest.param(True, marks=needs_onednn)])
def test_batched_products_equal_one_product_per_matrix(route, monkeypatch):
    # an encoder layer's directions: a stack of products, on strided slices as the LSTM steps use them
    monkeypatch.setattr(matmul, "enabled", lambda: route)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 9, 30, 50, generator=g)[:, 4, :21]                 # (2, 21, 50), batches strided
    w = torch.randn(2, 23, 50, generator=g)
    c = torch.randn(2, 40, 23, generator=g)[:, :21]
    b = torch.randn(2, 21, 11, generator=g)
    close = dict(atol=1e-5, rtol=1e-5)
    prepared = matmul.prepare_t(w)
    assert prepared.onednn is route and prepared.w.is_contiguous()       # the path asked for ran
    assert prepared.w.shape == (w.shape if route else w.transpose(1, 2).shape)
    torch.testing.assert_close(matmul.bmm_t(a, prepared), a @ w.transpose(1, 2), **close)
    torch.testing.assert_close(matmul.bmm_t(a, prepared, c), c + a @ w.transpose(1, 2), **close)
    bias = c[:, :1]                                                        # (2, 1, 23): a bias row per matrix
    torch.testing.assert_close(matmul.bmm_t(a, prepared, bias), bias + a @ w.transpose(1, 2), **close)
    out = torch.zeros(2, 30, 23)
    matmul.bmm_t(a, prepared, out=out[:, 3:24])                           # into a strided slice
    torch.testing.assert_close(out[:, 3:24], a @ w.transpose(1, 2), **close)
    assert not out[:, :3].any() and not out[:, 24:].any()
    matmul.bmm_t(a, prepared, bias, out=out[:, 3:24])                     # both
    torch.testing.assert_close(out[:, 3:24], bias + a @ w.transpose(1, 2), **close)
    with pytest.raises(RuntimeError, match=r"bmm_t: a must be \(d, m, 50\) for 2 prepared matrices, got \(3, 21, 50\)"):
        matmul.bmm_t(torch.zeros(3, 21, 50), prepared)
    with pytest.raises(RuntimeError, match=r"bmm_tn: a and b must hold as many matrices"):
        matmul.bmm_tn(a, b[:1])
    torch.testing.assert_close(matmul.bmm_tn(a, b), a.transpose(1, 2) @ b, **close)
    m = torch.randn(2, 50, 13, generator=g)                                # a @ m through its transpose
    torch.testing.assert_close(matmul.bmm_t(a, matmul.prepare_t(m.transpose(1, 2))), a @ m, **close)


@needs_onednn
def test_linear_through_onednn_has_the_gradients_of_f_linear(onednn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(9, 16, generator=g, requires_grad=True)
    y = matmul.linear(x, w)
    assert type(y.grad_fn).__name__ == "_LinearBackward"                  # the oneDNN path ran
    probe = torch.randn(y.shape, generator=g)
    (y * probe).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = torch.nn.functional.linear(x64, w64)
    (y64 * probe.double()).sum().backward()
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y64.float(), **close)
    torch.testing.assert_close(x.grad, x64.grad.float(), **close)
    torch.testing.assert_close(w.grad, w64.grad.float(), **close)


def test_other_dtypes_and_autocast_keep_torchs_own_products(onednn):
    x, w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, dtype=torch.float64)
    assert type(matmul.linear(x, w).grad_fn).__name__ != "_LinearBackward"
    x32, w32 = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = matmul.linear(x32, w32)
    assert y.dtype == torch.bfloat16                                      # autocast's F.linear ran


@needs_onednn
@pytest.mark.parametrize("input_feeding", [True, False])
def test_a_float32_training_step_through_onednn_matches_mkl(input_feeding, monkeypatch):
    """The whole training pass (hand-written decoder backward, output layer, loss), both ways."""
    cfg = ModelConfig(src_vocab_size=40, tgt_vocab_size=45, embedding_size=16, encoder_hidden_size=12,
                      decoder_hidden_sizes=[14, 18], attention_size=10, input_feeding=input_feeding, dropout=0.0)
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, 40, (6, 9), generator=g)
    src_len = torch.tensor([9, 7, 9, 3, 5, 8])
    for b in range(6):
        src[b, src_len[b]:] = 0
    tgt = torch.randint(3, 45, (6, 8), generator=g)
    tgt[2, 5:] = 0

    def step(route: bool):
        monkeypatch.setattr(matmul, "enabled", lambda: route)
        torch.manual_seed(0)
        model = Seq2Seq(cfg).train()
        loss, _ = model.token_loss(src, src_len, tgt[:, :-1], tgt[:, 1:], label_smoothing=0.1)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_dnn, grads_dnn = step(True)
    loss_mkl, grads_mkl = step(False)
    torch.testing.assert_close(loss_dnn, loss_mkl, atol=1e-5, rtol=1e-5)
    for name in grads_mkl:
        torch.testing.assert_close(grads_dnn[name], grads_mkl[name], atol=1e-5, rtol=1e-4, msg=name)
