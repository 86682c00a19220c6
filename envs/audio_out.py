"""Live audio output through sounddevice (PortAudio), with one clear error when there is none."""

from __future__ import annotations

from typing import Callable, Optional

from melodjinn.world_model.errors import MelodjinnError


class NoAudioDevice(MelodjinnError):
    """No PortAudio library or no output device: live playback is impossible here."""


HEADLESS_HINT = "use the headless mode instead: `melodjinn play headless=true out=FILE.wav seconds=S`"


def _sounddevice(hint: str):
    try:
        import sounddevice
    except OSError as exc:  # the module imports PortAudio at import time
        raise NoAudioDevice(f"live audio needs PortAudio ({exc}); install libportaudio2, or {hint}") from None
    return sounddevice


def open_output(sample_rate: int, callback: Optional[Callable] = None, blocksize: int = 0, hint: str = HEADLESS_HINT):
    """A started mono float32 OutputStream on the default device (a blocking-write stream without a callback).
    `hint`: what the error tells a user without a device to do instead."""
    sd = _sounddevice(hint)
    try:
        stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32", callback=callback, blocksize=blocksize)
        stream.start()
    except Exception as exc:  # PortAudioError and friends: no device, device busy, unsupported rate
        raise NoAudioDevice(f"no usable audio output device ({str(exc).strip() or type(exc).__name__}); {hint}") from None
    return stream
