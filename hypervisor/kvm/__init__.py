"""KVM (Linux ``virt/kvm/kvm_main.c``, ``arch/arm64/kvm/{mmu,guest,arm}.c``): kvm_host (types),
kvm_main (VM and vCPU ioctls), memslot, mmu (stage 2), copy_tags."""
