"""`melodjinn <command> key=value ...`

Each command is a plain Python function `fn(cfg: DictConfig)` living beside the code it drives; this module only
maps command names to those functions and to their primary config in `configs/<command>.yaml`, composes the
config with Hydra's compose API (so overrides, groups and `+new.key=value` work as in any Hydra app), and turns
user errors into one line on stderr with exit code 2.

From Python: `run("eval-codec", "checkpoint=checkpoints/codec-drums")` returns what the command returns.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Command:
    target: str  # "module:function", imported only when the command runs so `--help` stays instant
    summary: str

    @property
    def function(self) -> Callable[[DictConfig], Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "demo": Command("melodjinn.cli.demo:demo", "Steer the shipped drum world model with its discovered actions; writes WAVs, prints one JSON line."),
    "render-world": Command("melodjinn.world_model.render:render_world", "Write a synthetic world's WAV stems, mix and per-frame labels to out=DIR."),
    "train-codec": Command("melodjinn.world_model.codec_training:train_codec", "Train a codec (tiny or additive) on a synthetic world; writes safetensors + config.json to out=DIR."),
    "eval-codec": Command("melodjinn.world_model.codec_eval:eval_codec", "Print one JSON line of codec metrics (SI-SNR, drum-event F1) on held-out world audio."),
    "tokenize": Command("melodjinn.world_model.token_cache:tokenize", "Tokenise a folder of audio files (data.path=DIR) into an on-disk token cache (out=DIR)."),
    "train-world": Command("melodjinn.world_model.training:train_world", "Jointly train the latent action model and the multi-stream dynamics on a world (out=DIR, resume=true)."),
    "eval-world": Command("melodjinn.world_model.evaluation:eval_world", "Print one JSON line of world-model metrics (action NMI, controllability, delta PSNR, token CE)."),
    "plot-actions": Command("melodjinn.world_model.plotting:plot_actions", "Plot a held-out clip, its LAM actions and the dynamics' re-generation from them (out=FILE.png)."),
    "train-prior": Command("melodjinn.agents.prior_training:train_prior", "Behaviour-clone an action prior (a small Llama over action and section tokens) on a world model's LAM actions (out=DIR)."),
    "train-agent": Command("melodjinn.agents.ppo:train_agent", "Train a PPO agent (stable-baselines3) on the batched music env: task reward + prior_beta * log prior (out=DIR, resume=true)."),
    "eval-agent": Command("melodjinn.agents.evaluation:eval_agent", "Print one JSON line: returns of an agent and of random, constant and prior baselines on the same seeds, and its prior log-likelihood."),
    "train-reward": Command("melodjinn.feedback.reward_training:train_reward", "Train a reward model (TRL RewardTrainer, a small Llama over codec tokens) on a listener's A/B answers in a preference store (out=DIR)."),
    "personalise": Command("melodjinn.feedback.dpo:personalise", "Tune an action prior on one listener's A/B ratings with DPO (TRL DPOTrainer); writes the tuned prior to out=DIR."),
    "eval-personal": Command("melodjinn.feedback.evaluation:eval_personal", "Print one JSON line: win rate of a personalised prior over its base under a hidden preference on fresh contexts (or, with store=DIR, against the number of ratings)."),
    "play": Command("melodjinn.envs.player:play", "Play the world model live (keys inject actions, a policy drives when idle), or headless=true out=FILE.wav seconds=S."),
    "rate": Command("melodjinn.feedback.sessions:rate", "A listening session: two continuations of one context, the listener answers A/B/tie/skip; every answer is stored at once (store=DIR)."),
    "bench": Command("melodjinn.cli.bench:bench", "Print benchmark figures as JSON: `melodjinn bench codec`, `bench generation`, `bench train`, `bench env` or `bench ppo`."),
}

# Commands whose first bare word is a sub-target rather than an override (`melodjinn bench codec`).
POSITIONAL_TARGET = {"bench": "target"}


def _config_name(command: str) -> str:
    return command.replace("-", "_")


def compose(command: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config `melodjinn <command> <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if command not in COMMANDS:
        raise_unknown_command(command)
    _check_override_syntax(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="melodjinn.configs", version_base=None):
        cfg = hydra_compose(config_name=_config_name(command), overrides=list(overrides))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _check_override_syntax(overrides: Sequence[str]) -> None:
    """Hydra's parse errors do not say which override failed; parse one at a time to name it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from melodjinn.world_model.errors import ConfigError

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"cannot parse override {override!r} ({reason}); write key=value, e.g. world.num_drums=5") from None


def raise_unknown_command(command: str):
    from melodjinn.world_model.errors import ConfigError

    raise ConfigError(f"unknown command {command!r}; run `melodjinn --help` for the list")


def run(command: str, *overrides: str) -> Any:
    """Compose the config for `command` and run it in this process. Returns the command's result."""
    from melodjinn.world_model.runtime import apply_runtime

    from melodjinn.world_model.errors import ConfigError

    cfg = compose(command, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}; pass them as " + " ".join(f"{k}=..." for k in missing))
    apply_runtime(cfg)
    return COMMANDS[command].function(cfg)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: melodjinn <command> [key=value ...]",
        "",
        "Overrides follow Hydra: key=value, group=option (world=songs), +new.key=value.",
        "`melodjinn <command> --cfg` prints the resolved config without running.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"melodjinn: error: unknown command {command!r}; run `melodjinn --help` for the list", file=sys.stderr)
        return 2
    if command in POSITIONAL_TARGET and args and "=" not in args[0] and not args[0].startswith("-"):
        args = [f"{POSITIONAL_TARGET[command]}={args[0]}", *args[1:]]
    print_cfg = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    if any(a in ("-h", "--help") for a in args):
        print(f"melodjinn {command}: {COMMANDS[command].summary}\n\nconfig (override with key=value):\n")
        args = [a for a in args if a not in ("-h", "--help")]
        print_cfg = True

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from melodjinn.world_model.errors import MelodjinnError

    try:
        if print_cfg:
            print(OmegaConf.to_yaml(compose(command, args)), end="")
            return 0
        result = run(command, *args)
    except (MelodjinnError, HydraException, OmegaConfBaseException) as exc:
        print(f"melodjinn {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"melodjinn {command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
