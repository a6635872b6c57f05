"""The model against known truths: nn.LSTM equivalence, teacher forcing, masking, packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seq2seq.attention import ATTENTION_TYPES, Memory, build_attention
from seq2seq.decoder import Bridge, CellStack
from seq2seq.encoder import Encoder
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.tokenizer import BOS_ID, PAD_ID

from .conftest import random_sources


def test_cell_stack_looped_over_time_equals_nn_lstm():
    torch.manual_seed(0)
    batch, steps, inp, hid, layers = 3, 7, 5, 6, 3
    lstm = nn.LSTM(inp, hid, num_layers=layers, batch_first=True)
    stack = CellStack(inp, [hid] * layers, dropout=0.0)
    with torch.no_grad():
        for i, cell in enumerate(stack.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(lstm, f"{name}_l{i}"))
    x = torch.randn(batch, steps, inp)
    h0, c0 = torch.randn(layers, batch, hid), torch.randn(layers, batch, hid)
    expected, (h_n, c_n) = lstm(x, (h0, c0))
    hidden = tuple((h0[i], c0[i]) for i in range(layers))
    outputs = []
    for t in range(steps):
        hidden = stack(x[:, t], hidden)
        outputs.append(hidden[-1][0])
    torch.testing.assert_close(torch.stack(outputs, 1), expected)
    torch.testing.assert_close(torch.stack([h for h, _ in hidden]), h_n)
    torch.testing.assert_close(torch.stack([c for _, c in hidden]), c_n)


@pytest.mark.parametrize("input_feeding", [True, False])
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_teacher_forcing_equals_step_by_step(attention, input_feeding):
    torch.manual_seed(0)
    # dot attention needs decoder top size == encoder output size (2 * 12)
    cfg = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, embedding_size=16, encoder_hidden_size=12,
                      encoder_layers=2, decoder_hidden_sizes=[20, 24], attention=attention, dropout=0.0,
                      input_feeding=input_feeding)
    model = Seq2Seq(cfg).eval()
    src, src_len = random_sources([5, 3, 7], 30, seed=1)
    tgt_in = torch.randint(4, 25, (3, 6))
    tgt_in[:, 0] = BOS_ID
    logits, attn = model(src, src_len, tgt_in)  # (3, 6, 25), (3, 6, 7)
    memory, state = model.encode(src, src_len)
    for t in range(tgt_in.size(1)):
        log_probs, state, weights = model.decode_step(tgt_in[:, t], state, memory)
        torch.testing.assert_close(log_probs, torch.log_softmax(logits[:, t], -1))
        torch.testing.assert_close(weights, attn[:, t])


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_attention_is_zero_at_padding_and_sums_to_one(attention):
    torch.manual_seed(0)
    att = build_attention(attention, 8, 8, 10)
    values = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    context, weights = att(torch.randn(3, 8), att.project_keys(values), values, mask)
    assert torch.all(weights[~mask] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    # the context only mixes real positions
    torch.testing.assert_close(context[2], values[2, 0])


def test_bahdanau_scores_at_real_positions_only_equal_the_padded_computation():
    """Where most of the memory is padding, the energies are computed at real positions only:
    same context and weights as over every position, for single steps and for whole sequences."""
    torch.manual_seed(0)
    att = build_attention("bahdanau", 8, 6, 10)
    values = torch.randn(3, 9, 6)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, n in enumerate([9, 2, 4]):
        mask[i, :n] = True                      # 15 of 27 positions real: under the threshold
    keys = att.project_keys(values)
    assert mask.sum() < att.ragged_below * mask.numel()
    for query in (torch.randn(3 * 4, 8), torch.randn(3, 5, 8)):   # 4 beam rows per sentence; 5 steps
        with torch.no_grad():
            ragged = att(query, keys, values, mask)
        padded = att(query, keys, values, mask)  # with gradients: every position, padding included
        for a, b in zip(ragged, padded):
            torch.testing.assert_close(a, b)
        assert torch.all(ragged[1].reshape(3, -1, 9).transpose(0, 1)[:, ~mask] == 0)


def test_cell_stack_over_time_equals_looping_it():
    torch.manual_seed(0)
    stack = CellStack(5, [6, 4, 7], dropout=0.0)
    x = torch.randn(3, 8, 5)
    hidden = tuple((torch.randn(3, d), torch.randn(3, d)) for d in (6, 4, 7))
    looped, state = [], hidden
    for t in range(8):
        state = stack(x[:, t], state)
        looped.append(state[-1][0])
    torch.testing.assert_close(stack.over_time(x, hidden), torch.stack(looped, 1))


def test_unknown_attention_names_the_choices():
    with pytest.raises(ValueError, match="luong_dott.*bahdanau, dot, general"):
        ModelConfig(src_vocab_size=5, tgt_vocab_size=5, attention="luong_dott")


def test_dot_attention_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="dot attention needs"):
        build_attention("dot", 10, 12, 10)


def test_padding_never_changes_a_sentence_encoding():
    torch.manual_seed(0)
    enc = Encoder(30, 8, 6, num_layers=2, bidirectional=True).eval()
    src, src_len = random_sources([4], 30, seed=1)
    alone, (h1, c1) = enc(src, src_len)
    padded = torch.cat([src, torch.full((1, 5), PAD_ID)], 1)
    other, _ = random_sources([9], 30, seed=3)
    both, (h2, c2) = enc(torch.cat([padded, other]), torch.tensor([4, 9]))
    torch.testing.assert_close(both[0, :4], alone[0])
    assert torch.all(both[0, 4:] == 0)
    torch.testing.assert_close(h2[:, 0], h1[:, 0])
    torch.testing.assert_close(c2[:, 0], c1[:, 0])


def test_dropout_keeps_its_rate_and_scale_and_is_off_in_eval():
    from seq2seq.dropout import Dropout
    layer, x = Dropout(0.3), torch.ones(200_000)
    y = layer(x)
    kept = y[y != 0]
    assert abs(kept.numel() / x.numel() - 0.7) < 0.01
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))
    assert layer.eval()(x) is x


def test_word_dropout_drops_whole_tokens_at_its_rate_and_scale_and_is_off_in_eval():
    from seq2seq.dropout import word_dropout
    x = torch.rand(400, 500, 8) + 0.5                      # (batch, len, emb), no zeros of its own
    y = word_dropout(x, 0.25)
    dropped = (y == 0).all(-1)                             # (batch, len)
    assert ((y == 0).any(-1) == dropped).all()             # a token is dropped whole or not at all
    assert abs(dropped.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    assert word_dropout(x, 0.25, training=False) is x and word_dropout(x, 0.0) is x


@pytest.mark.parametrize("input_feeding", [True, False])
def test_word_dropout_reaches_both_embeddings_in_training_only(input_feeding, monkeypatch):
    # what the encoder LSTM and the decoder cells read: each source and target token's embedding
    # whole and scaled by 1 / (1 - p), or zeros; in eval mode the model is the one without it
    torch.manual_seed(0)
    kwargs = dict(src_vocab_size=30, tgt_vocab_size=25, embedding_size=16, encoder_hidden_size=12,
                  decoder_hidden_sizes=[20], dropout=0.0, input_feeding=input_feeding)
    model = Seq2Seq(ModelConfig(word_dropout=0.5, **kwargs))
    plain = Seq2Seq(ModelConfig(**kwargs))
    plain.load_state_dict(model.state_dict())
    src, src_len = random_sources([40, 40, 40], 30, seed=1)
    tgt_in = torch.randint(4, 25, (3, 40))
    tgt_in[:, 0] = BOS_ID
    seen = {}
    segmented, embed = model.encoder.segmented, model.decoder.embed

    def encoder_reads(emb, lens):
        seen["src"] = emb
        return segmented(emb, lens)

    def decoder_reads(tokens):
        seen["tgt"] = embed(tokens)
        return seen["tgt"]

    monkeypatch.setattr(model.encoder, "segmented", encoder_reads)
    monkeypatch.setattr(model.decoder, "embed", decoder_reads)
    model.train()
    model(src, src_len, tgt_in)
    for name, tokens, table in (("src", src, model.encoder.embedding), ("tgt", tgt_in, model.decoder.embedding)):
        read, full = seen[name].detach(), table(tokens).detach() * 2       # (3, 40, 16) each
        dropped = (read == 0).all(-1)
        assert 0.3 < dropped.float().mean().item() < 0.7, name
        torch.testing.assert_close(read[~dropped], full[~dropped], msg=name)
    model.eval()
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(src, src_len, tgt_in)[0], plain.eval()(src, src_len, tgt_in)[0])
    with pytest.raises(ValueError, match="model.word_dropout must be in \\[0, 1\\), got 1.0"):
        ModelConfig(word_dropout=1.0, **kwargs)


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("layers,bidirectional", [(1, True), (1, False), (2, True), (3, False)])
def test_segmented_encoder_equals_nn_lstm_over_packed_sequences(layers, bidirectional, kernels, monkeypatch):
    # outputs, final states and every gradient, with lengths from 1 to the full width in any order;
    # training runs a layer's directions as lstm.sorted_lstm, or (kernels) each as fused LSTM kernels
    # over length segments, as under bfloat16 autocast
    if kernels:
        from seq2seq import encoder as encoder_module

        def segments(x, lengths, *stacked):
            runs = [encoder_module._run_segments(x[d], lengths, tuple(w[d] for w in stacked), True)
                    for d in range(x.size(0))]
            return tuple(torch.stack(parts) for parts in zip(*runs))
        monkeypatch.setattr(encoder_module, "sorted_lstm", segments)
    torch.manual_seed(layers)
    enc = Encoder(50, 8, 6, layers, bidirectional).double()
    src, src_len = random_sources([9, 1, 4, 9, 6, 4, 2], 50, seed=2)
    results = []
    for how in ("segmented", "packed"):
        enc.zero_grad()
        out, (h, c) = getattr(enc, how)(enc.embedding(src), src_len)
        g = torch.Generator().manual_seed(0)
        probe = sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in (out, h, c))
        probe.backward()
        results.append((out.detach(), h.detach(), c.detach(),
                        {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (out, h, c, grads), (ref_out, ref_h, ref_c, ref_grads) = results
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * layers * (2 if bidirectional else 1) + 1
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


@pytest.mark.parametrize("enc_layers,bidirectional,dec_sizes", [
    (1, True, [7]), (3, True, [7, 9]), (1, False, [5, 6, 7]), (2, False, [4]), (2, True, [3, 3, 3, 3])])
def test_bridge_handles_any_directions_and_layers(enc_layers, bidirectional, dec_sizes):
    dirs = 2 if bidirectional else 1
    bridge = Bridge("dense", 6, enc_layers, dirs, dec_sizes)
    h_n, c_n = torch.randn(dirs * enc_layers, 4, 6), torch.randn(dirs * enc_layers, 4, 6)
    states = bridge(h_n, c_n)
    assert [tuple(h.shape) for h, _ in states] == [(4, d) for d in dec_sizes]
    assert [tuple(c.shape) for _, c in states] == [(4, d) for d in dec_sizes]
    # the top decoder layer starts from the top encoder layer (both directions)
    top = h_n.view(enc_layers, dirs, 4, 6)[-1].permute(1, 0, 2).reshape(4, -1)
    torch.testing.assert_close(states[-1][0], torch.tanh(bridge.h_proj[-1](top)))


def test_tied_embeddings_share_one_matrix():
    model = Seq2Seq(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, embedding_size=8,
                                encoder_hidden_size=6, decoder_hidden_sizes=[10], tie_embeddings=True))
    assert model.decoder.output_layer.weight is model.decoder.embedding.weight


def test_memory_and_state_reorder_by_index(tiny_model):
    src, src_len = random_sources([5, 3, 7], 30, seed=1)
    memory, state = tiny_model.encode(src, src_len)
    idx = torch.tensor([2, 0])
    m2, s2 = memory.index_select(idx), state.index_select(idx)
    assert isinstance(m2, Memory)
    for field in Memory._fields:                     # values, keys, mask
        assert torch.equal(getattr(m2, field), getattr(memory, field)[idx]), field
    for (h2, c2), (h, c) in zip(s2.hidden, state.hidden, strict=True):
        assert torch.equal(h2, h[idx]) and torch.equal(c2, c[idx])
    assert torch.equal(s2.feed, state.feed[idx])


def test_shared_and_tied_embeddings_are_one_matrix():
    model = Seq2Seq(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, embedding_size=8, encoder_hidden_size=6,
                                decoder_hidden_sizes=[10], tie_embeddings=True, share_embeddings=True))
    w = model.encoder.embedding.weight
    assert model.decoder.embedding.weight is w and model.decoder.output_layer.weight is w


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_beam_rows_sharing_one_memory_row_equal_a_replicated_memory(attention):
    """A sentence's k beams attend over its one memory row exactly as over k copies of it."""
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=30, tgt_vocab_size=30, embedding_size=8, encoder_hidden_size=6,
                                decoder_hidden_sizes=[12], attention=attention)).eval()
    src, src_len = random_sources([5, 3, 7], 30, seed=2)
    memory, state = model.encode(src, src_len)
    k = 4
    expand = torch.arange(3).repeat_interleave(k)                  # (3*k,) sentence of each beam row
    state = state.index_select(expand)
    prev = torch.randint(3, 30, (3 * k,))
    shared = model.decode_step(prev, state, memory)                 # memory: 3 rows for 12 state rows
    copied = model.decode_step(prev, state, memory.index_select(expand))
    for a, b in zip((shared[0], shared[2], shared[1].feed), (copied[0], copied[2], copied[1].feed)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="10 query rows cannot share 3 sentences"):
        model.decode_step(prev[:10], state.index_select(torch.arange(10)), memory)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_dropout_masks_drop_at_the_rate_in_every_lane_of_a_random_word(p):
    from seq2seq.dropout import dropout_mask
    mask = dropout_mask((100_003,), p, torch.float32, "cpu")                # not a multiple of 4
    torch.testing.assert_close(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / (1 - p)))
    # each 64-bit word gives four elements: a lane that is never or always dropped would show here
    lanes = (mask[:100_000] == 0).view(-1, 4).float().mean(0)
    assert torch.all((lanes - p).abs() < 0.01), lanes
    assert not torch.equal(mask, dropout_mask((100_003,), p, torch.float32, "cpu"))


def test_sorted_lstm_names_unsorted_or_too_long_lengths():
    from seq2seq.lstm import sorted_lstm
    lstm = nn.LSTM(3, 4)
    w = [p.unsqueeze(0) for p in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)]
    with pytest.raises(ValueError, match=r"lengths must be non-increasing and at most the width 5, got \[2, 3\]"):
        sorted_lstm(torch.zeros(1, 2, 5, 3), [2, 3], *w)
    with pytest.raises(ValueError, match=r"at most the width 5, got \[6, 1\]"):
        sorted_lstm(torch.zeros(1, 2, 5, 3), [6, 1], *w)
    with pytest.raises(ValueError, match=r"one length per row of x \(2\), got 1"):
        sorted_lstm(torch.zeros(1, 2, 5, 3), [2], *w)
    with pytest.raises(ValueError, match=r"x must be \(dirs, batch, width, in\), w_ih \(dirs, 4h, in\), .*"
                                         r"got \(2, 5, 3\), \(1, 16, 3\), \(1, 16, 4\), \(1, 16\) and \(1, 16\)"):
        sorted_lstm(torch.zeros(2, 5, 3), [2, 1], *w)
    with pytest.raises(ValueError, match=r"got \(1, 2, 5, 3\), \(1, 16, 3\), \(1, 16, 4\), \(16,\) and \(1, 16\)"):
        sorted_lstm(torch.zeros(1, 2, 5, 3), [2, 1], w[0], w[1], w[2][0], w[3])  # a bias not stacked
    out, h, c = sorted_lstm(torch.zeros(1, 2, 5, 3), [0, 0], *w)            # nothing to run: zeros
    assert out.shape == (1, 2, 5, 4) and not out.any() and not h.any() and not c.any()
    assert h.shape == c.shape == (1, 2, 4)


def test_sorted_lstm_gradients_with_a_row_of_length_zero():
    # a length the packed nn.LSTM reference cannot take (0): finite differences, and that row's
    # outputs and states are zero
    from seq2seq.lstm import sorted_lstm
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
         for s in ((2, 8, 3), (2, 8, 2), (2, 8), (2, 8))]
    assert torch.autograd.gradcheck(lambda *t: sorted_lstm(t[0], [3, 1, 0], *t[1:]), (x, *w))
    out, h, c = sorted_lstm(x, [3, 1, 0], *w)
    assert not out[:, 2].any() and not out[:, 1, 1:].any() and out[:, 1, 0].all()
    assert not h[:, 2].any() and not c[:, 2].any() and h[:, :2].all()


def test_roll_gates_puts_o_first_and_back_along_any_dim():
    from seq2seq.lstm import roll_gates
    w = torch.arange(8.0).view(8, 1)                                          # gates i, f, g, o of 2 rows each
    assert roll_gates(w, 1, dim=0).view(-1).tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
    assert torch.equal(roll_gates(roll_gates(w, 1, dim=0), -1, dim=0), w)
    stacked = w.view(1, 8).expand(3, 8)                                       # (dirs, 4h)
    assert torch.equal(roll_gates(stacked, 1, dim=-1), roll_gates(stacked, 1, dim=1))
    assert roll_gates(stacked, 1, dim=1)[2].tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="shift must be 1"):
        roll_gates(w, 2, dim=0)


def test_float32_encoder_training_through_onednn_products_equals_packed_sequences(monkeypatch):
    from seq2seq import matmul
    if not matmul._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(matmul, "enabled", lambda: True)                   # as on an AMD CPU with AVX-512
    torch.manual_seed(3)
    enc = Encoder(50, 8, 6, 1, True)
    src, src_len = random_sources([9, 1, 4, 9, 6, 4, 2], 50, seed=2)
    results = []
    for how in ("segmented", "packed"):
        enc.zero_grad()
        out, (h, c) = getattr(enc, how)(enc.embedding(src), src_len)
        (out.sum() + (h * c).sum()).backward()
        results.append((out.detach(), h.detach(), c.detach(), [p.grad.clone() for p in enc.parameters()]))
    (out, h, c, grads), (ref_out, ref_h, ref_c, ref_grads) = results
    for a, b in zip((out, h, c, *grads), (ref_out, ref_h, ref_c, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
