"""The action prior: a small causal LM over action and section tokens, behaviour-cloned on the LAM's actions.

It answers "what would the music in the training audio do next, here?": p(a_j | a_<j, s_≤j). The env adds
β·log p as a bonus that keeps a PPO agent musical, the player samples from it when the listener is idle, and
DPO tunes it (it is also DPO's frozen reference model).

A sequence is one token per section and per action, interleaved, so every action is predicted right after the
section it plays in (sections are given by the song, never predicted):

    <bos> [verse] a3 [verse] a0 [verse] a0 [chorus] a5 ...         ids: 1, 5+s, 10+a, ...

The model is a transformers `LlamaForCausalLM` built from config (no download) and the tokenizer a local
tokenizers `WordLevel` vocabulary wrapped in `PreTrainedTokenizerFast`, so TRL's trainers take both as they are.
A prior directory is what `save_pretrained` writes — `config.json` (the Llama config, plus a `melodjinn` entry:
artefact kind, code version, action count, context, the world model and data it was cloned from, its
held-out metrics), `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`; each file written atomically,
config.json last.
The history the prior sees is cropped to its last `context` steps, as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from melodjinn.agents.pretrained import load_pretrained, pretrained_meta, save_pretrained
from melodjinn.world_model.artifacts import CONFIG_FILE, read_json
from melodjinn.world_model.errors import CheckpointError, DataError
from melodjinn.world_model.worlds import SECTIONS

ARTIFACT_KIND = "action-prior"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
SECTION_OFFSET = len(SPECIAL_TOKENS)  # id of the first section token
ACTION_OFFSET = SECTION_OFFSET + len(SECTIONS)  # id of action token a0


def section_token(section: int) -> str:
    return f"[{SECTIONS[section]}]"


def action_token(action: int) -> str:
    return f"a{action}"


def build_tokenizer(num_actions: int):
    """The prior's tokenizer: specials, one token per section, one per action; split on whitespace only."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(section_token(s) for s in range(len(SECTIONS))), *(action_token(a) for a in range(num_actions))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


@dataclass
class PriorModelConfig:
    dim: int = 64  # hidden size
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    mlp_dim: int = 176  # SwiGLU inner size (≈ 8/3 · dim, rounded)
    context: int = 128  # action steps of history the prior sees (a song-world bar is 128 frames)


def build_model(num_actions: int, cfg: PriorModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=ACTION_OFFSET + num_actions, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=1 + 2 * cfg.context, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama)


class ActionPrior:
    """A behaviour-cloned action prior: the Llama model, its tokenizer, and what it was trained for."""

    def __init__(self, model, tokenizer, num_actions: int, context: int, info: dict[str, Any] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_actions = int(num_actions)
        self.context = int(context)
        self.info = dict(info or {})

    @classmethod
    def create(cls, num_actions: int, cfg: PriorModelConfig, seed: int = 0, info: dict[str, Any] | None = None) -> "ActionPrior":
        return cls(build_model(num_actions, cfg, seed), build_tokenizer(num_actions), num_actions, cfg.context, info)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- token sequences -----------------------------------------------------------------------------------

    def encode(self, actions: torch.Tensor, sections: torch.Tensor, next_sections: torch.Tensor | None = None) -> torch.Tensor:
        """(B, J) actions + (B, J) sections → (B, 1 + 2J) ids `<bos> s0 a0 s1 a1 ...`; with `next_sections`
        (B,) one more section token is appended, so the last position predicts the next action."""
        if actions.shape != sections.shape or actions.dim() != 2:
            raise DataError(f"actions and sections must both be (B, J), got {tuple(actions.shape)} and {tuple(sections.shape)}")
        self._check(actions, sections)
        B, J = actions.shape
        ids = torch.empty(B, 1 + 2 * J + (next_sections is not None), dtype=torch.long, device=actions.device)
        ids[:, 0] = SPECIAL_TOKENS.index(BOS)
        ids[:, 1 : 1 + 2 * J : 2] = SECTION_OFFSET + sections
        ids[:, 2 : 2 + 2 * J : 2] = ACTION_OFFSET + actions
        if next_sections is not None:
            self._check(None, next_sections)
            ids[:, -1] = SECTION_OFFSET + next_sections.to(actions.device)
        return ids

    def text(self, actions: torch.Tensor, sections: torch.Tensor) -> list[str]:
        """The same sequences as whitespace-separated token text (what TRL's trainers read)."""
        return self.tokenizer.batch_decode(self.encode(actions, sections).tolist())

    def _check(self, actions: torch.Tensor | None, sections: torch.Tensor) -> None:
        if actions is not None and actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.num_actions):
            raise DataError(f"actions must lie in [0, {self.num_actions}), got [{int(actions.min())}, {int(actions.max())}]")
        if sections.numel() and (int(sections.min()) < 0 or int(sections.max()) >= len(SECTIONS)):
            raise DataError(f"sections must lie in [0, {len(SECTIONS)}), got [{int(sections.min())}, {int(sections.max())}]")

    def _action_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids → (B, L, A) logits over action tokens only at every position."""
        return self.model(input_ids=ids.to(self.device)).logits[..., ACTION_OFFSET : ACTION_OFFSET + self.num_actions]

    # ---- scoring and sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def next_log_probs(self, actions: torch.Tensor, sections: torch.Tensor, next_sections: torch.Tensor) -> torch.Tensor:
        """log p(a_next | history) over the A actions: (B, H) past actions and their sections (H may be 0), (B,)
        the section the next action plays in → (B, A). Only the last `context - 1` steps are seen."""
        keep = max(self.context - 1, 0)
        actions, sections = actions[:, actions.shape[1] - min(keep, actions.shape[1]):], sections[:, sections.shape[1] - min(keep, sections.shape[1]):]
        ids = self.encode(actions.long(), sections.long(), next_sections.long().reshape(-1))
        return F.log_softmax(self._action_logits(ids)[:, -1].float(), dim=-1).cpu()

    @torch.no_grad()
    def sample(self, actions: torch.Tensor, sections: torch.Tensor, next_sections: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) next actions drawn from the prior at `temperature` (0 = the most likely action)."""
        logp = self.next_log_probs(actions, sections, next_sections)
        if temperature < 0:
            raise DataError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            return logp.argmax(-1)
        return torch.multinomial(F.softmax(logp / temperature, dim=-1), 1, generator=generator)[:, 0]

    def sequence_log_probs(self, actions: torch.Tensor, sections: torch.Tensor) -> torch.Tensor:
        """(B, J) log p(a_j | a_<j, s_≤j), each sequence read in consecutive windows of `context` steps that
        start afresh (as in training). Differentiable; call under no_grad to score."""
        B, J = actions.shape
        out = []
        for start in range(0, J, self.context):
            a, s = actions[:, start : start + self.context].long(), sections[:, start : start + self.context].long()
            logits = self._action_logits(self.encode(a, s))[:, 1::2]  # the positions holding a section token
            out.append(F.log_softmax(logits.float(), dim=-1).gather(-1, a.to(logits.device)[..., None])[..., 0])
        return torch.cat(out, 1) if out else torch.zeros(B, 0)

    # ---- save / load ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the prior with `save_pretrained` into `directory` (file by file, atomically, config.json last)."""
        return save_pretrained(directory, self.model, self.tokenizer, ARTIFACT_KIND,
                               {"num_actions": self.num_actions, "context": self.context, **self.info})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ActionPrior":
        from transformers import LlamaForCausalLM

        directory = Path(directory)
        meta = pretrained_meta(directory, ARTIFACT_KIND, "an action prior", "train one with `melodjinn train-prior`")
        model, tokenizer = load_pretrained(directory, LlamaForCausalLM)
        expected = build_tokenizer(int(meta["num_actions"])).get_vocab()
        if tokenizer.get_vocab() != expected:
            raise CheckpointError(f"{directory}: its tokenizer's vocabulary differs from this code's for {meta['num_actions']} actions; re-train the prior")
        info = {k: v for k, v in meta.items() if k not in ("kind", "code", "num_actions", "context")}
        prior = cls(model.to(device), tokenizer, meta["num_actions"], meta["context"], info)
        prior.directory = directory
        return prior


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> ActionPrior:
    """A prior directory, or a world-model checkpoint (shipped name or path) whose `prior/` holds one."""
    from melodjinn.world_model.artifacts import resolve_checkpoint

    path = Path(path)
    if (path / CONFIG_FILE).exists() and "melodjinn" in read_json(path / CONFIG_FILE):
        return ActionPrior.load(path, device)
    try:
        prior = resolve_checkpoint(path) / "prior"
    except CheckpointError:
        raise CheckpointError(f"{path} is neither an action prior nor a world-model checkpoint; train a prior with "
                              f"`melodjinn train-prior checkpoint=WORLD_MODEL out={path}`") from None
    if not (prior / CONFIG_FILE).exists():
        raise CheckpointError(f"{path} holds no action prior (looked in {prior}); train one with `melodjinn train-prior checkpoint={path} out={prior}`")
    return ActionPrior.load(prior, device)
