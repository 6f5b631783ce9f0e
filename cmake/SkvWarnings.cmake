# Project-wide warning and sanitizer flags, applied through skv_target_defaults().

# The codec's bit-exactness contract (reference vs SIMD vs CUDA) relies on every multiply and
# add being rounded separately; forbid the compiler from fusing them.
add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-ffp-contract=off>)

if(SKV_SANITIZE AND SKV_SANITIZE_THREAD)
  message(FATAL_ERROR "SKV_SANITIZE and SKV_SANITIZE_THREAD cannot be combined (ASan and TSan exclude each other)")
endif()
if(SKV_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()
if(SKV_SANITIZE_THREAD)
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
endif()

function(skv_target_defaults target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
      -Wcast-align -Wunused -Woverloaded-virtual -Wnull-dereference -Wimplicit-fallthrough>)
  if(SKV_WERROR)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()
