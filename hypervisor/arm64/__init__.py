"""arm64 MTE code (Linux ``arch/arm64/kernel/mte.c``, ``arch/arm64/mm/{copypage,mteswap}.c``,
``arch/arm64/include/asm/mte.h``): mte, mte_lock, tags (every tag read/write), copypage, mteswap."""
