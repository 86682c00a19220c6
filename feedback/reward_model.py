"""The reward model: how much a listener would like a continuation, read from what they heard — its codec tokens.

It is trained (feedback/reward_training.py, TRL's `RewardTrainer`) on a listener's A/B answers with the
Bradley-Terry loss −log σ(r(chosen) − r(rejected)), so only differences of scores mean anything. The env turns
it into a reward with `PreferenceReward(RewardModel.load(directory))`, which calls `score(tokens (B, S, K, T))`.

Text layout. A clip's tokens become one word per (stream, codebook, value), frame-major: every frame lists its
streams, each stream its first `codebooks` codebooks, and one `<eos>` closes the clip. The model is a causal
transformer, so `<eos>` is the one position that has seen the whole clip; the score is read there
(`LlamaForSequenceClassification` pools the last non-pad token).

    tokens (S=1, K=4, T=3), codebooks=2          text
      k0:  17  17  90                              s0k0v17 s0k1v4 s0k0v17 s0k1v4 s0k0v90 s0k1v61 <eos>
      k1:   4   4  61                              └─ frame 0 ──┘ └─ frame 1 ──┘ └─ frame 2 ──┘    └ score
      k2, k3: not read                             ids: 4 + (s·codebooks + k)·V + v, then <eos> = 2

Why only the first codebook by default: the residual quantiser's first codebook carries most of what a listener
hears (which drum, how loud); the later ones refine it. Measured on the drum world (a listener who likes the snare,
48 answers with the utility's sign, 62 held-out pairs, 4 splits): codebook 0 alone ranked held-out pairs right
0.73-0.76 of the time and clips by the hidden utility at Spearman r 0.59-0.73; all four codebooks 0.60-0.74 and
0.41-0.62, at five times the training time. A smaller model also did better on so few answers (dim 32, one block:
above; dim 64, two blocks: 0.60-0.68).

The model is a transformers `LlamaForSequenceClassification` (num_labels=1) built from config, no download; the
tokenizer a local tokenizers `WordLevel` vocabulary in `PreTrainedTokenizerFast` — TRL takes both as they are,
and the text it tokenises gives exactly the ids `score` builds with tensor arithmetic (tests check this).
A reward-model directory is what `save_pretrained` writes, each file atomically, config.json last; config.json's
`melodjinn` entry holds the artefact kind, code version, the codec shape it reads (S, K, V), the codebooks it
reads, the clip length it was trained on, and the store, listener, pairs and held-out accuracy of its training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melodjinn.agents.pretrained import load_pretrained, pretrained_meta, save_pretrained
from melodjinn.agents.prior import BOS, EOS, PAD, SPECIAL_TOKENS, UNK
from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError

ARTIFACT_KIND = "reward-model"
WORD_OFFSET = len(SPECIAL_TOKENS)  # id of the first codec word (s0k0v0)
EOS_ID = SPECIAL_TOKENS.index(EOS)


def codec_word(stream: int, codebook: int, value: int) -> str:
    return f"s{stream}k{codebook}v{value}"


def build_tokenizer(streams: int, codebooks: int, codebook_size: int):
    """Specials, then one word per (stream, codebook, value) in id order; split on whitespace only."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(codec_word(s, k, v) for s in range(streams) for k in range(codebooks) for v in range(codebook_size))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


@dataclass
class RewardModelConfig:
    codebooks: int = 1  # codec codebooks read per stream (the first ones); 0 = all K
    dim: int = 32  # hidden size
    layers: int = 1  # transformer blocks
    heads: int = 4  # attention heads
    mlp_dim: int = 88  # SwiGLU inner size (≈ 8/3 · dim, rounded)
    max_frames: int = 1024  # longest clip (frames) it can read: sets the position range


@dataclass(frozen=True)
class CodecShape:
    """What the model reads: S streams, K codebooks of V values (the world model's codec), of which the first
    `codebooks` per stream become words."""

    streams: int
    num_codebooks: int
    codebook_size: int
    codebooks: int

    @property
    def words_per_frame(self) -> int:
        return self.streams * self.codebooks



def build_model(shape: CodecShape, cfg: RewardModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    llama = LlamaConfig(
        vocab_size=WORD_OFFSET + shape.words_per_frame * shape.codebook_size, hidden_size=cfg.dim,
        intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=shape.words_per_frame * cfg.max_frames + 1,
        pad_token_id=SPECIAL_TOKENS.index(PAD), bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=EOS_ID,
        num_labels=1,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama)


class RewardModel:
    """A listener's learned preference over clips: the Llama scorer, its tokenizer, and the codec shape it reads."""

    def __init__(self, model, tokenizer, shape: CodecShape, info: dict[str, Any] | None = None, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.shape = shape
        self.info = dict(info or {})
        self.batch_size = int(batch_size)

    @classmethod
    def create(cls, streams: int, num_codebooks: int, codebook_size: int, cfg: RewardModelConfig, seed: int = 0,
               info: dict[str, Any] | None = None) -> "RewardModel":
        codebooks = cfg.codebooks or num_codebooks
        if not 1 <= codebooks <= num_codebooks:
            raise ConfigError(f"model.codebooks={cfg.codebooks}: the codec has {num_codebooks} codebooks; read 1 to "
                              f"{num_codebooks} of them (0 = all)")
        shape = CodecShape(int(streams), int(num_codebooks), int(codebook_size), int(codebooks))
        return cls(build_model(shape, cfg, seed), build_tokenizer(shape.streams, codebooks, codebook_size), shape, info)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- tokens → ids --------------------------------------------------------------------------------------

    def encode(self, tokens: Any) -> torch.Tensor:
        """(B, S, K, T) codec tokens → (B, S·codebooks·T + 1) ids in the text layout (module docstring)."""
        tokens = self.check(tokens)[:, :, : self.shape.codebooks]  # (B, S, c, T)
        B, S, c, T = tokens.shape
        slot = (torch.arange(S)[:, None] * c + torch.arange(c)[None, :]).view(1, S, c, 1)  # word group of (s, k)
        words = WORD_OFFSET + slot * self.shape.codebook_size + tokens  # (B, S, c, T)
        ids = words.permute(0, 3, 1, 2).reshape(B, T * S * c)  # frame-major
        return torch.cat([ids, torch.full((B, 1), EOS_ID, dtype=torch.long)], 1)

    def text(self, tokens: Any) -> list[str]:
        """The same sequences as whitespace-separated words (what TRL's RewardTrainer tokenises)."""
        return [" ".join(self.tokenizer.convert_ids_to_tokens(row)) for row in self.encode(tokens).tolist()]

    def check(self, tokens: Any) -> torch.Tensor:
        """Tokens as a (B, S, K, T) long tensor on the CPU, or a DataError saying what is wrong."""
        tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise DataError(f"tokens must be integer codec tokens, got dtype {tokens.dtype}")
        S, K, V = self.shape.streams, self.shape.num_codebooks, self.shape.codebook_size
        if tokens.dim() != 4 or tuple(tokens.shape[1:3]) != (S, K) or tokens.shape[3] < 1:
            raise DataError(f"this reward model reads tokens (B, S={S}, K={K}, T) from the codec it was trained on, "
                            f"got shape {tuple(tokens.shape)}; score clips of that world model, or train a reward "
                            "model on ratings of this one")
        if tokens.shape[3] * self.shape.words_per_frame + 1 > self.model.config.max_position_embeddings:
            raise DataError(f"clips of {tokens.shape[3]} frames are longer than this reward model reads "
                            f"({(self.model.config.max_position_embeddings - 1) // self.shape.words_per_frame}); "
                            "score shorter clips or train with a larger model.max_frames")
        tokens = tokens.long().cpu()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise DataError(f"codec tokens must lie in [0, {V}), got [{int(tokens.min())}, {int(tokens.max())}]; "
                            "these are not this codec's tokens")
        return tokens

    # ---- scoring -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, tokens: Any) -> np.ndarray:
        """(B, S, K, T) codec tokens → (B,) scores (higher = preferred), `batch_size` clips per forward pass."""
        ids = self.encode(tokens)  # (B, L)
        out = [self.model(input_ids=chunk.to(self.device)).logits[:, 0].float().cpu()
               for chunk in ids.split(self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)

    # ---- save / load ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the model with `save_pretrained` into `directory` (file by file, atomically, config.json last)."""
        return save_pretrained(directory, self.model, self.tokenizer, ARTIFACT_KIND, {"shape": asdict(self.shape), **self.info})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        from transformers import LlamaForSequenceClassification

        directory = Path(directory)
        meta = pretrained_meta(directory, ARTIFACT_KIND, "a reward model",
                               f"train one with `melodjinn train-reward store=RATINGS_DIR out={directory}`")
        try:
            shape = CodecShape(**{k: int(v) for k, v in meta["shape"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}/config.json: its melodjinn.shape is malformed ({exc}); re-train the reward model") from None
        model, tokenizer = load_pretrained(directory, LlamaForSequenceClassification)
        if tokenizer.get_vocab() != build_tokenizer(shape.streams, shape.codebooks, shape.codebook_size).get_vocab():
            raise CheckpointError(f"{directory}: its tokenizer's vocabulary is not this code's for shape {asdict(shape)}; re-train the reward model")
        if model.config.vocab_size != WORD_OFFSET + shape.words_per_frame * shape.codebook_size or model.config.num_labels != 1:
            raise CheckpointError(f"{directory}: its model (vocab {model.config.vocab_size}, {model.config.num_labels} labels) "
                                  f"does not match its shape {asdict(shape)}; re-train the reward model")
        info = {k: v for k, v in meta.items() if k not in ("kind", "code", "shape")}
        reward = cls(model.to(device), tokenizer, shape, info)
        reward.directory = directory
        return reward
