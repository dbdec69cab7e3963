#!/usr/bin/env bash
# CI: install from the project's own files on a fresh machine, then run
# exactly the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dashboard's smoke test drives the real program in tmux.
if ! command -v tmux >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 \
    || echo "tmux could not be installed; the dashboard's tmux smoke test will be skipped"
fi

# The service tests check the generated unit with `systemd-analyze verify`.
if ! command -v systemd-analyze >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq systemd) >/dev/null 2>&1 \
    || echo "systemd-analyze could not be installed; the unit verification test will be skipped"
fi

# The Vulkan pinning tests need a Vulkan device: Mesa's lavapipe (software),
# and vulkaninfo, which discovery reads.
if ! command -v vulkaninfo >/dev/null || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq mesa-vulkan-drivers vulkan-tools) >/dev/null 2>&1 \
    || echo "Mesa's lavapipe could not be installed; the Vulkan pinning tests will be skipped"
fi

# The multi-host tests make hosts of network namespaces (iproute2), each with a
# real sshd (openssh-server) that the OpenSSH client reaches.
if ! command -v ip >/dev/null || ! command -v ssh >/dev/null || ! [ -x /usr/sbin/sshd ]; then
  (apt-get update -qq && apt-get install -y -qq iproute2 openssh-client openssh-server) >/dev/null 2>&1 \
    || echo "iproute2 or OpenSSH could not be installed; the multi-host tests will be skipped"
fi

python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The `server` extra compiles llama.cpp once (~12 min on 2 cores); pip caches the wheel.
python -m pip install --quiet -e '.[server,dev]'

llama-orch --version
