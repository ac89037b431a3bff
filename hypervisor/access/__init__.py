"""CPU accesses to memory with the MTE tag check: tagcheck (the one check both use), user
(host processes' loads, stores, STG, LDG, IRG), vcpu (guest accesses after stage 1, through
stage 2). Linux has no such directory: this is the CPU, arch/arm64/kernel/mte.c's TCF
handling and KVM_RUN's fault loop."""
