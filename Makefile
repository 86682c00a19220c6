# Set-up and the everyday jobs. Every target does the set-up it needs, so each works from a fresh clone.
#
#   make demo        the main job on the built-in default (shipped checkpoints, synthetic world)
#   make test        the fast test suite (what CI runs)
#   make test-slow   the long recipes: full training to the acceptance metrics
#
# Set-up creates .venv and installs torch FIRST, so nothing later pulls a CUDA torch on a CPU machine.
# GPU users: install the torch build you want into .venv (or pass TORCH_SPEC) before `make setup`;
# an importable torch is kept as it is.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# encodec 0.1.1 declares torchaudio, which has no build matching every torch; it needs it only for
# resampling and file I/O, which melodjinn does with soxr and soundfile. So: install it without deps.
ENCODEC_SPEC ?= encodec==0.1.1

.PHONY: setup system-deps demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(ENCODEC_SPEC)
	$(BIN)/python -c "import torch, melodjinn.world_model.codec as c; c.import_encodec(); print('melodjinn ready: torch', torch.__version__)"
	touch $@

# PortAudio for sounddevice (live playback). Without it everything but live playback still works.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libportaudio; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libportaudio2 >/dev/null) \
	      || echo "warning: could not install libportaudio2; live playback disabled, headless mode works"; \
	  else \
	    echo "note: install PortAudio (e.g. apt-get install libportaudio2) for live playback"; \
	  fi; \
	fi

demo: setup
	$(BIN)/melodjinn demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/melodjinn bench codec

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
