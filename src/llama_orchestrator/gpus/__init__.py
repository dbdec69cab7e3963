"""GPUs: discovery (`discover`, over NVML, nvidia-smi, rocm-smi, `vulkan` and
`amdgpu`), the backends an instance may run on (`backends`), the variables
that pin a process to cards (`pinning`), card alerts (`alerts`) and the
decisions of script tasks' leases (`leases`; the daemon's side is
`daemon.leases`)."""
