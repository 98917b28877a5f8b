# Compiler warnings shared by every kvrecall target (kvrecall_apply_warnings).
set(KVRECALL_CXX_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
    -Werror=unused-result -Werror=return-type
    -Wno-maybe-uninitialized)  # GCC 12 false positives through std::string and absl inlines
if(KVRECALL_WERROR)
  list(APPEND KVRECALL_CXX_WARNINGS -Werror)
endif()

function(kvrecall_apply_warnings target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${KVRECALL_CXX_WARNINGS}>)
endfunction()
