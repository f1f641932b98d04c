# Sourced by scripts/repro.sh and scripts/test.sh: the project's virtual environment (.venv), created and set up
# when absent or when what it was set up from changed (pyproject.toml, scripts/setup.sh), then put first on PATH.
# SHADOWLLM_VENV=0 uses the python3 already on PATH instead (a machine set up by hand).
if [[ "${SHADOWLLM_VENV:-1}" != "0" ]]; then
  venv="$PWD/.venv"
  stamp="$venv/.shadowllm-setup"
  want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
  if [[ ! -x "$venv/bin/python3" ]]; then
    echo "env: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "env: setting up $venv (scripts/setup.sh)" >&2
    PATH="$venv/bin:$PATH" bash scripts/setup.sh
    echo "$want" > "$stamp"
  fi
  export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
fi
