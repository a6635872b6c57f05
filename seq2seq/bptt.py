"""Teacher-forced training of the input-feeding decoder, with backpropagation through time written out.

With input feeding, step t+1 reads step t's attentional vector, so training loops over
target steps. Left to autograd, every step records some forty small operations and,
in the backward pass, computes each weight's gradient from that step's batch alone:
matrix products whose inner dimension is the batch (128), which a CPU runs far from
its peak, plus autograd's bookkeeping for each of them. `TeacherForced` runs the same
computation (`Decoder._step` over all steps: the LSTMCell stack, attention, the
combine layer) as one autograd node:

- the embedding's share of the first cell's gates is one product for all steps;
- each step's cell input [previous attentional vector; previous h] is written into a
  time-major buffer, so a step's gates are one product with the concatenated weights;
- the backward pass keeps each step's gate, combine and query gradients and forms
  every weight gradient with one product over all steps (inner dimension steps x batch),
  as fused RNN kernels do; gradients of the encoder outputs likewise.

Precision: under CPU/GPU autocast to bfloat16 (Lightning's `bf16-mixed`), the matrix
products run in bfloat16 with the weights cast once per call, while the LSTM cell
state, gate nonlinearities, Bahdanau's energies (`energy.py`), softmax and every
accumulated gradient stay in float32 (float32 master weights are the optimiser's). Otherwise
everything runs in the inputs' dtype. tests/test_bptt.py holds outputs and every
gradient to those of the step-by-step decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import energy as bahdanau_energy
from . import matmul
from .dropout import dropout_mask
from .lstm import cell_derivatives, roll_gates, rows_going
from .matmul import addmm_t, mm_t, mm_tn, transposed


@dataclass(frozen=True)
class Spec:
    """What the function needs besides tensors."""

    hidden_sizes: tuple[int, ...]  # per cell layer
    attention: str                 # "bahdanau" | "dot" | "general"
    dropout: float                 # between cell layers (training only)
    dtype: torch.dtype             # of the matrix products
    active: tuple[int, ...]        # per step, the rows still going (rows come sorted by length)


def teacher_forced(decoder, embedded: torch.Tensor, hidden, feed: torch.Tensor, memory,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`Decoder._step` over all target steps; returns what the step-by-step loop stacks.

    Args:
        decoder: the `Decoder` whose cells, attention and combine layer are used.
        embedded: (batch, steps, emb) dropped-out target embeddings.
        hidden: initial (h, c) of every layer, each (batch, hidden_l).
        feed: (batch, output_size) the initial attentional vector.
        memory: `Memory` (values (batch, src_len, enc_out), keys, mask (batch, src_len)).
        lengths: optional (batch,) steps each row needs (its real target tokens): rows are then
            sorted by length and each step runs only the rows still going; positions past a
            row's length get zero vectors and weights instead of what the loop computes there.
    Returns:
        attentional vectors (batch, steps, output_size) and attention weights
        (batch, steps, src_len); the weights carry no gradient.
    """
    cells = decoder.cells.cells
    attention = decoder.attention
    kind = {"BahdanauAttention": "bahdanau", "DotAttention": "dot", "GeneralAttention": "general"}[
        type(attention).__name__]
    p = decoder.cells.dropout.p if decoder.cells.training else 0.0
    batch, steps = embedded.shape[:2]
    mm_dtype = matmul.product_dtype(embedded)
    order = None
    # not where oneDNN multiplies (matmul.onednn_multiplies: bfloat16 autocast, or float32 on AMD
    # CPUs with AVX-512): it compiles a kernel for every new row count, and each step would bring one
    if lengths is not None and not matmul.onednn_multiplies(embedded) and bool((lengths < steps).any()):
        order = torch.argsort(lengths, descending=True, stable=True)             # longest first
        active = rows_going(lengths[order].tolist(), steps)
        embedded, feed = embedded.index_select(0, order), feed.index_select(0, order)
        hidden = [(h.index_select(0, order), c.index_select(0, order)) for h, c in hidden]
        memory = memory.index_select(order)
    else:
        active = (batch,) * steps
    spec = Spec(tuple(c.hidden_size for c in cells), kind, p, mm_dtype, active)
    tensors = [t for h, c in hidden for t in (h, c)]
    for cell in cells:
        tensors += [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    if kind == "bahdanau":
        tensors += [attention.query_layer.weight, attention.energy_layer.weight]
    tensors.append(decoder.combine.weight)
    vectors, weights = TeacherForced.apply(spec, embedded, feed, memory.values, memory.keys, memory.mask, *tensors)
    if order is None:
        return vectors, weights
    back = torch.argsort(order)
    return vectors.index_select(0, back), weights.index_select(0, back)


class TeacherForced(torch.autograd.Function):
    """Arguments: spec, embedded, feed, values, keys, mask, then per layer h0, c0, then per
    layer W_ih, W_hh, b_ih, b_hh, then (bahdanau) W_query, v, then W_combine."""

    @staticmethod
    def forward(ctx, spec: Spec, embedded, feed, values, keys, mask, *tensors):
        with torch.autocast(embedded.device.type, enabled=False):
            return _forward(ctx, spec, embedded, feed, values, keys, mask, tensors)

    @staticmethod
    def backward(ctx, d_vectors, d_weights):
        with torch.autocast(d_vectors.device.type, enabled=False):
            return (None, *_backward(ctx, d_vectors))


def _unpack(spec: Spec, tensors):
    n = len(spec.hidden_sizes)
    states = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)]
    params = [tuple(tensors[2 * n + 4 * i: 2 * n + 4 * i + 4]) for i in range(n)]
    rest = tensors[6 * n:]
    att = tuple(rest[:2]) if spec.attention == "bahdanau" else ()
    return states, params, att, rest[-1]


def _forward(ctx, spec: Spec, embedded, feed, values, keys, mask, tensors):
    states, params, att, w_combine = _unpack(spec, tensors)
    cdt, f32 = spec.dtype, torch.promote_types(spec.dtype, torch.float32)
    batch, steps, emb_size = embedded.shape
    sizes = spec.hidden_sizes
    out_size = feed.size(1)
    in_sizes = [out_size] + list(sizes[:-1])  # per layer, besides the embedding for layer 0
    top = sizes[-1]
    value_size = values.size(2)
    dev = embedded.device

    # the gates run in the order o, i, f, g (lstm.roll_gates): one sigmoid for o, i, f
    # layer 0: the embedding's share of the gates for all steps at once, biases included
    w_ih0, _, b_ih0, b_hh0 = params[0]
    emb_t = embedded.transpose(0, 1).reshape(steps * batch, emb_size).to(cdt)   # (steps*batch, emb)
    w_emb = roll_gates(w_ih0[:, :emb_size].to(cdt), 1, dim=0)                      # (4h0, emb)
    b0 = roll_gates((b_ih0 + b_hh0).to(cdt), 1, dim=0)                             # (4h0,)
    pre0 = addmm_t(b0, emb_t, w_emb).view(steps, batch, -1)                        # (steps, batch, 4h0)
    # per layer: [input; h] @ [W_ih; W_hh]^T, the input being the previous attentional vector for layer 0
    w_cat = [roll_gates(torch.cat([(w_ih[:, emb_size:] if i == 0 else w_ih), w_hh], 1).to(cdt), 1, dim=0)
             for i, (w_ih, w_hh, _, _) in enumerate(params)]                        # (4h, in + h)
    biases = [None] + [roll_gates((b_ih + b_hh).to(cdt), 1, dim=0) for _, _, b_ih, b_hh in params[1:]]
    z = [torch.empty(steps + 1, batch, in_sizes[i] + sizes[i], dtype=cdt, device=dev)
         for i in range(len(sizes))]                                               # cell inputs per step
    cs = [torch.empty(steps + 1, batch, sizes[i], dtype=f32, device=dev) for i in range(len(sizes))]
    acts = [torch.empty(steps, batch, 4 * sizes[i], dtype=f32, device=dev) for i in range(len(sizes))]
    tanh_c = [torch.empty(steps, batch, sizes[i], dtype=f32, device=dev) for i in range(len(sizes))]
    z[0][0, :, :out_size] = feed
    for i, (h0, c0) in enumerate(states):
        z[i][0, :, in_sizes[i]:] = h0
        cs[i][0] = c0
    drop = None
    if spec.dropout > 0 and len(sizes) > 1:
        drop = [None] + [dropout_mask((steps, batch, sizes[i - 1]), spec.dropout, f32, dev)
                         for i in range(1, len(sizes))]                            # (steps, batch, h_below)

    values_c = values.to(cdt)
    masked = ~mask                                                                 # (batch, src_len)
    weights = torch.empty(steps, batch, values.size(1), dtype=f32, device=dev)     # attention per step
    combined = torch.empty(steps, batch, value_size + top, dtype=cdt, device=dev)  # [context; top] per step
    w_comb = w_combine.to(cdt)                                                     # (out, enc_out + top)
    if spec.attention == "bahdanau":
        # the energies run in float32 (energy.py): the keys widened once for all steps
        keys_c = keys.to(f32).contiguous()                                         # (batch, src_len, att)
        w_query = att[0].to(cdt)                                                   # (att, top)
        v = att[1].to(f32).view(-1)                                                # (att,)
        queries = torch.empty(steps, batch, w_query.size(0), dtype=cdt, device=dev)
    else:
        keys_c = keys.to(cdt)
        queries = None
        keys_t = keys_c.transpose(1, 2)                                            # (batch, key_dim, src_len)
    vectors = torch.empty(steps, batch, out_size, dtype=f32, device=dev)

    for t, n in enumerate(spec.active):                                            # n: rows still going
        for i, h in enumerate(sizes):
            if i == 0:
                gates = addmm_t(pre0[t, :n], z[0][t, :n], w_cat[0])               # (n, 4h)
            else:
                gates = addmm_t(biases[i], z[i][t, :n], w_cat[i])
            act = acts[i][t, :n]
            torch.sigmoid(gates[:, :3 * h], out=act[:, :3 * h])
            torch.tanh(gates[:, 3 * h:], out=act[:, 3 * h:])
            gate_o, gate_i, gate_f, gate_g = act.split(h, 1)
            c = torch.mul(gate_f, cs[i][t, :n], out=cs[i][t + 1, :n]).addcmul_(gate_i, gate_g)  # (n, h)
            tc = torch.tanh(c, out=tanh_c[i][t, :n])
            h_new = torch.mul(gate_o, tc, out=z[i][t + 1, :n, in_sizes[i]:])      # (n, h) in cdt
            if i + 1 < len(sizes):  # dropped out from float32, rounded to cdt once
                z[i + 1][t, :n, :in_sizes[i + 1]] = h_new if drop is None else gate_o * tc * drop[i + 1][t, :n]
        query = z[-1][t + 1, :n, in_sizes[-1]:]                                    # (n, top) in cdt
        if spec.attention == "bahdanau":
            q = mm_t(query, w_query, out=queries[t, :n])                           # (n, att)
            scores = bahdanau_energy.scores(keys_c[:n], q, v)                      # (n, src_len)
        else:
            scores = torch.bmm(query.unsqueeze(1), keys_t[:n]).squeeze(1)          # (n, src_len)
        scores = scores.to(f32).masked_fill_(masked[:n], float("-inf"))
        alpha = weights[t, :n]
        alpha.copy_(torch.softmax(scores, dim=-1))                                 # (n, src_len)
        row = combined[t, :n]
        torch.bmm(alpha.to(cdt).unsqueeze(1), values_c[:n], out=row[:, :value_size].unsqueeze(1))  # context
        row[:, value_size:] = query
        vec = torch.tanh(mm_t(row, w_comb).to(f32), out=vectors[t, :n])            # (n, out)
        z[0][t + 1, :n, :out_size] = vec
    # rows past their ends: zero outputs, and zero inputs for the weight gradients' products
    _zero_past_ends(spec.active, [*z, combined, vectors, weights])

    ctx.spec, ctx.shapes = spec, (batch, steps, emb_size, out_size, in_sizes, value_size)
    ctx.input_dtypes = (embedded.dtype, feed.dtype, values.dtype, keys.dtype)
    ctx.param_dtypes = [t.dtype for t in tensors]
    ctx.drop = drop
    extra = (w_query, v) if spec.attention == "bahdanau" else ()
    ctx.save_for_backward(emb_t, values_c, keys_c, weights, combined, vectors,
                          queries if queries is not None else weights, w_emb, w_comb,
                          *extra, *w_cat, *z, *cs, *acts, *tanh_c)
    ctx.mark_non_differentiable(weights)
    return vectors.to(cdt).transpose(0, 1), weights.transpose(0, 1)                # (batch, steps, ·)


def _backward(ctx, d_vectors):
    spec = ctx.spec
    batch, steps, emb_size, out_size, in_sizes, value_size = ctx.shapes
    sizes = spec.hidden_sizes
    n = len(sizes)
    saved = list(ctx.saved_tensors)
    emb_t, values_c, keys_c, weights, combined, vectors, queries, w_emb, w_comb = saved[:9]
    rest = saved[9:]
    bahdanau = spec.attention == "bahdanau"
    if bahdanau:
        w_query, v = rest[:2]                                                      # v: (att,) float32
        rest = rest[2:]
    w_cat, z, cs, acts, tanh_c = (rest[k * n:(k + 1) * n] for k in range(5))
    cdt = spec.dtype
    f32 = torch.promote_types(cdt, torch.float32)
    dev = d_vectors.device
    top = sizes[-1]

    values_t = values_c.transpose(1, 2)                                            # (batch, enc_out, src_len)
    d_vec = d_vectors.transpose(0, 1).to(f32)                                      # (steps, batch, out)
    active = spec.active
    d_gates = [torch.empty(steps, batch, 4 * h, dtype=cdt, device=dev) for h in sizes]
    d_comb_pre = torch.empty(steps, batch, out_size, dtype=cdt, device=dev)        # before the combine tanh
    d_combined = torch.empty(steps, batch, value_size + top, dtype=cdt, device=dev)
    if bahdanau:
        d_queries = torch.empty(steps, batch, w_query.size(0), dtype=cdt, device=dev)
        d_v = torch.zeros(v.size(0), dtype=f32, device=dev)
        # d energy[b,s,:] = ds[b,s] v (1 - energy[b,s,:]^2): the key gradient summed over steps is
        # v * (sum_t ds_t - sum_t ds_t energy_t^2), so two accumulators stand in for a
        # (batch, src_len, att) gradient per step (energy.backward)
        ds_sum = torch.zeros(keys_c.shape[:2], dtype=f32, device=dev)             # (batch, src_len)
        ds_energy_sq = torch.zeros(keys_c.shape, dtype=f32, device=dev)           # (batch, src_len, att)
    else:
        d_scores_all = torch.empty(steps, batch, keys_c.size(1), dtype=cdt, device=dev)
    # the state gradients from step t+1, for the rows going at step t+1 (a row's gradient is zero
    # past its end): grown with zero rows as the rows still going grow towards the first step
    last = active[-1] if active else batch
    d_h = [torch.zeros(last, h, dtype=f32, device=dev) for h in sizes]
    d_c = [torch.zeros(last, h, dtype=f32, device=dev) for h in sizes]
    d_feed = torch.zeros(last, out_size, dtype=f32, device=dev)
    # the weights as the step products read them: contiguous copies of their transposes
    w_comb_t, w_cat_t = transposed(w_comb), [transposed(w) for w in w_cat]
    w_query_t = transposed(w_query) if bahdanau else None
    # for all steps at once: the combine tanh's derivative, and each layer's gate derivatives
    d_tanh_vec = 1 - vectors * vectors                                             # (steps, batch, out)
    partners, d_c_of_h = zip(*(cell_derivatives(acts[i], cs[i][:steps], tanh_c[i]) for i in range(n)))

    for t in reversed(range(steps)):
        m = active[t]                                                              # rows going at step t
        if d_feed.size(0) < m:
            d_h, d_c = [_grow(g, m) for g in d_h], [_grow(g, m) for g in d_c]
            d_feed = _grow(d_feed, m)
        d_pre = (d_vec[t, :m] + d_feed).mul_(d_tanh_vec[t, :m])                    # (m, out)
        d_comb_pre[t, :m] = d_pre
        d_row = mm_t(d_comb_pre[t, :m], w_comb_t, out=d_combined[t, :m])           # (m, enc_out + top)
        d_context = d_row[:, :value_size]
        d_top = d_row[:, value_size:].to(f32)
        alpha = weights[t, :m]                                                     # (m, src_len)
        d_alpha = torch.bmm(d_context.unsqueeze(1), values_t[:m]).squeeze(1).to(f32)  # (m, src_len)
        d_scores = alpha * (d_alpha - (alpha * d_alpha).sum(1, keepdim=True))      # (m, src_len)
        if bahdanau:
            sq_weighted = bahdanau_energy.backward(keys_c[:m], queries[t, :m], v, d_scores, d_v,
                                                   ds_energy_sq[:m])
            ds_sum[:m].add_(d_scores)                                              # sq_weighted: (m, att)
            d_q = bahdanau_energy.gradient(d_scores.sum(1), sq_weighted, v)        # (m, att)
            d_queries[t, :m] = d_q
            d_top.add_(mm_t(d_queries[t, :m], w_query_t))
        else:
            d_scores_all[t, :m] = d_scores
            d_top.add_(torch.bmm(d_scores_all[t, :m].unsqueeze(1), keys_c[:m]).squeeze(1))
        d_top.add_(d_h[-1])
        d_below = d_top
        for i in reversed(range(n)):
            h = sizes[i]
            dh = d_below                                                           # (m, h)
            dc = d_c[i].addcmul_(dh, d_c_of_h[i][t, :m])                           # (m, h)
            dg = d_gates[i][t, :m]                                                 # (m, 4h): o, i, f, g
            p = partners[i][t, :m]
            torch.mul(dh, p[:, :h], out=dg[:, :h])
            torch.mul(dc.unsqueeze(1), p[:, h:].unflatten(1, (3, h)), out=dg[:, h:].unflatten(1, (3, h)))
            d_c[i] = dc.mul_(acts[i][t, :m, 2 * h:3 * h])                           # times f
            d_in = mm_t(dg, w_cat_t[i]).to(f32)                                     # (m, in + h)
            d_h[i] = d_in[:, in_sizes[i]:]
            if i > 0:
                d_input = d_in[:, :in_sizes[i]]
                if ctx.drop is not None:
                    d_input = d_input * ctx.drop[i][t, :m]
                d_below = d_input + d_h[i - 1]
            else:
                d_feed = d_in[:, :out_size]

    _zero_past_ends(active, [*d_gates, d_comb_pre, d_combined, d_queries if bahdanau else d_scores_all])

    def flat(x):
        return x.reshape(steps * batch, -1)

    grads_params = []
    for i in range(n):
        dg = flat(d_gates[i])                                                      # (steps*batch, 4h): o, i, f, g
        d_wcat = mm_tn(dg, flat(z[i][:steps])).to(f32)                             # (4h, in + h)
        if i == 0:
            d_wcat = torch.cat([mm_tn(dg, emb_t).to(f32), d_wcat], 1)              # (4h, emb + out + h)
        d_wcat = roll_gates(d_wcat, -1, dim=0)                                      # back to i, f, g, o
        d_b = roll_gates(dg.to(f32).sum(0), -1, dim=0)                             # (4h,)
        split = in_sizes[i] + (emb_size if i == 0 else 0)
        grads_params += [d_wcat[:, :split], d_wcat[:, split:], d_b, d_b.clone()]
    d_emb = mm_t(flat(d_gates[0]), transposed(w_emb)).view(steps, batch, emb_size).transpose(0, 1)  # (batch, steps, emb)
    tops = combined[:, :, value_size:].transpose(0, 1)                             # (batch, steps, top)
    weights_c = weights.permute(1, 2, 0).to(cdt)                                   # (batch, src_len, steps)
    d_values = torch.bmm(weights_c, d_combined[:, :, :value_size].transpose(0, 1))  # (batch, src_len, enc_out)
    att_grads = []
    if bahdanau:
        d_wq = mm_tn(flat(d_queries), flat(combined[:, :, value_size:]))           # (att, top)
        d_keys = bahdanau_energy.gradient(ds_sum, ds_energy_sq, v)                # (batch, src_len, att)
        att_grads = [d_wq, d_v.view(1, -1)]
    else:
        d_keys = torch.bmm(d_scores_all.permute(1, 2, 0), tops)                    # (batch, src_len, key_dim)
    d_wcomb = mm_tn(flat(d_comb_pre), flat(combined))                              # (out, enc_out + top)
    d_states = [(_grow(d_h[i], batch), _grow(d_c[i], batch)) for i in range(n)]
    d_feed = _grow(d_feed, batch)

    emb_dt, feed_dt, values_dt, keys_dt = ctx.input_dtypes
    grads = [d_emb.to(emb_dt), d_feed.to(feed_dt), d_values.to(values_dt), d_keys.to(keys_dt), None]
    grads += [g for hc in d_states for g in hc] + grads_params + att_grads + [d_wcomb]
    return [g if g is None or k < 5 else g.to(ctx.param_dtypes[k - 5]) for k, g in enumerate(grads)]


def _zero_past_ends(active: tuple[int, ...], buffers) -> None:
    """Rows active[t]: of each (steps[+1], batch, ...) buffer's step t set to zero (only they: the rest is written)."""
    for t, n in enumerate(active):
        if n < buffers[0].size(1):
            for buf in buffers:
                buf[t, n:] = 0


def _grow(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (r, size) with zero rows appended up to `rows`."""
    return x if x.size(0) >= rows else torch.cat([x, x.new_zeros(rows - x.size(0), x.size(1))])
