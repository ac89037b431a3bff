"""Generic memory management (Linux ``mm/``): mmap, memory (faults, set_pte_at, zap,
copy_page_range), swap, migrate, ksm, mmu_notifier."""
