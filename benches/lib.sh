# Shared by the benches/*.sh scripts (source it from the repository root).
# LIBTORCH: the project venv's torch (the one tch links against), unless the caller set one.
export LIBTORCH="${LIBTORCH:-$(readlink -f .venv)/lib/python3.11/site-packages/torch}"
# The Python with torch, numpy and safetensors: the project venv, else the host's python3.
bench_python() { if [ -x .venv/bin/python ]; then echo "$PWD/.venv/bin/python"; else command -v python3; fi; }
