"""The attention sequence-to-sequence model: encoder, bridge, decoder.

The model offers what search needs and nothing about search itself: `encode`,
`decode_step`, and reordering of its state and memory by index (`index_select` on
`DecoderState` and `Memory`). Teacher-forced training uses `forward`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .attention import ATTENTION_TYPES, Memory
from .decoder import BRIDGES, Bridge, Decoder, DecoderState
from .encoder import Encoder
from .loss import label_smoothed_nll, output_layer_nll
from .matmul import linear, pad_rows
from .tokenizer import PAD_ID


@dataclass
class ModelConfig:
    """Every architecture choice; stored in checkpoints as a plain dict."""

    src_vocab_size: int
    tgt_vocab_size: int
    embedding_size: int = 256
    encoder_hidden_size: int = 256
    encoder_layers: int = 1
    bidirectional: bool = True
    decoder_hidden_sizes: list[int] = field(default_factory=lambda: [512])
    attention: str = "bahdanau"
    attention_size: int | None = None
    bridge: str = "dense"
    input_feeding: bool = True
    dropout: float = 0.2
    word_dropout: float = 0.0  # probability of dropping a whole input token (source and target) in training
    tie_embeddings: bool = False
    share_embeddings: bool = False  # source and target share one embedding (joint vocab only)

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"Unknown attention {self.attention!r}; choose one of: {', '.join(ATTENTION_TYPES)}")
        if self.bridge not in BRIDGES:
            raise ValueError(f"Unknown bridge {self.bridge!r}; choose one of: {', '.join(BRIDGES)}")
        if isinstance(self.decoder_hidden_sizes, int):
            self.decoder_hidden_sizes = [self.decoder_hidden_sizes]
        self.decoder_hidden_sizes = [int(s) for s in self.decoder_hidden_sizes]
        for name in ("embedding_size", "encoder_hidden_size", "encoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.decoder_hidden_sizes or min(self.decoder_hidden_sizes) < 1:
            raise ValueError(f"model.decoder_hidden_sizes must be a non-empty list of sizes >= 1, "
                             f"got {self.decoder_hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"model.word_dropout must be in [0, 1), got {self.word_dropout}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("model.share_embeddings needs a joint vocabulary (tokenizer.joint=true)")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(
            config.src_vocab_size, config.embedding_size, config.encoder_hidden_size,
            config.encoder_layers, config.bidirectional, config.dropout, config.word_dropout,
        )
        self.bridge = Bridge(config.bridge, config.encoder_hidden_size, config.encoder_layers,
                             self.encoder.num_directions, config.decoder_hidden_sizes)
        self.decoder = Decoder(
            config.tgt_vocab_size, config.embedding_size, config.decoder_hidden_sizes,
            self.encoder.output_size, attention=config.attention, attention_size=config.attention_size,
            dropout=config.dropout, input_feeding=config.input_feeding, tie_embeddings=config.tie_embeddings,
            word_dropout=config.word_dropout,
        )
        if config.share_embeddings:
            self.decoder.embedding.weight = self.encoder.embedding.weight
            if config.tie_embeddings:  # three-way: source, target and output share one matrix
                self.decoder.output_layer.weight = self.decoder.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if "embedding" in name:
                nn.init.normal_(p, std=p.size(-1) ** -0.5)
                with torch.no_grad():
                    p[PAD_ID].zero_()
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif "bias" in name:
                nn.init.zeros_(p)
        # forget-gate bias 1 helps an LSTM carry information early in training
        for module in self.modules():
            if isinstance(module, (nn.LSTM, nn.LSTMCell)):
                for name, p in module.named_parameters():
                    if name.startswith("bias_ih"):
                        n = p.size(0) // 4
                        with torch.no_grad():
                            p[n:2 * n].fill_(1.0)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[Memory, DecoderState]:
        """src (batch, src_len), src_len (batch,) -> memory to attend over, initial decoder state."""
        outputs, (h_n, c_n) = self.encoder(src, src_len)
        memory = Memory(outputs, self.decoder.attention.project_keys(outputs), src != PAD_ID)
        return memory, self.decoder.initial_state(self.bridge(h_n, c_n))

    def decode_step(self, prev: torch.Tensor, state: DecoderState, memory: Memory
                    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """prev (rows,) -> log-probabilities (rows, vocab), new state, attention (rows, src_len).

        rows is the state's rows: memory's batch, or a multiple g of it where rows
        i*g .. i*g+g-1 belong to sentence i (its beams).
        """
        attn_vec, state, weights = self.decoder.step(prev, state, memory)
        log_probs = torch.log_softmax(self.decoder.logits(attn_vec).float(), dim=-1)
        return log_probs, state, weights

    @property
    def has_greedy_shortcut(self) -> bool:
        """Whether `greedy_step` applies: the output layer is a plain nn.Linear with a bias (not int8)."""
        layer = self.decoder.output_layer
        return type(layer) is nn.Linear and layer.bias is not None

    def greedy_step(self, prev: torch.Tensor, state: DecoderState, memory: Memory
                    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState, torch.Tensor]:
        """`decode_step` followed by argmax, without the (rows, vocab) log-softmax.

        prev (rows,) -> the most probable next token (rows,), its log-probability (rows,),
        new state, attention (rows, src_len). The logits are computed vocabulary-major,
        W @ attn_vecᵀ, which MKL runs faster than attn_vec @ Wᵀ for this shape. Only when
        `has_greedy_shortcut`.
        """
        layer = self.decoder.output_layer
        attn_vec, state, weights = self.decoder.step(prev, state, memory)          # (rows, out)
        logits = torch.addmm(layer.bias.unsqueeze(1), layer.weight, attn_vec.t()).float()  # (vocab, rows)
        token = logits.argmax(dim=0)                                                  # (rows,)
        best = logits.gather(0, token.unsqueeze(0)).squeeze(0)                        # (rows,)
        return token, best - torch.logsumexp(logits, dim=0), state, weights

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits (batch, tgt_len, vocab) and attention (batch, tgt_len, src_len)."""
        memory, state = self.encode(src, src_len)
        return self.decoder(tgt_in, state, memory)

    def token_loss(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """Summed label-smoothed cross-entropy of the real target tokens, and their count.

        The output layer, the largest product of a training step, skips the padding positions
        of `tgt_out` (batch, tgt_len) instead of computing them to ignore them, and its bias is
        added inside the loss, a cache-sized block at a time (loss.py); on the CPU outside
        autocast the product, too, is made there a chunk of rows at a time.
        """
        memory, state = self.encode(src, src_len)
        real = tgt_out != PAD_ID                                               # (batch, tgt_len)
        # rows stop at their last real token (the loss reads nothing after it)
        vectors, _ = self.decoder.attentional_vectors(tgt_in, state, memory, real.sum(1))  # (batch, tgt_len, out)
        layer = self.decoder.output_layer
        x = self.decoder.dropout(vectors[real])                                # (tokens, out)
        targets = tgt_out[real]                                                # (tokens,)
        on_cpu = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if on_cpu and x.dtype in (torch.float32, torch.float64):
            # the product and the loss a chunk of rows at a time (loss.py)
            return output_layer_nll(x, layer.weight, layer.bias, targets, label_smoothing), targets.numel()
        # rows padded to a shape whose kernels are reused from batch to batch (matmul.pad_rows)
        logits = linear(pad_rows(x), layer.weight)                             # (rows >= tokens, vocab)
        return label_smoothed_nll(logits, targets, label_smoothing, bias=layer.bias), targets.numel()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig | dict) -> Seq2Seq:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return Seq2Seq(config)

