// The fiber switch of cuda_emulation.h on x86-64 (System V): push the callee-saved registers,
// swap stack pointers, pop them from the other stack and return into it.
#include "cuda_emulation.h"

#if defined(SKV_EMULATION_FAST_SWITCH)
asm(R"(
  .text
  .globl skv_emulation_switch
  .type skv_emulation_switch, @function
skv_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size skv_emulation_switch, .-skv_emulation_switch
)");
#endif
