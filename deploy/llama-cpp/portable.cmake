# Included into llama-cpp-python's own CMake project (CMAKE_PROJECT_llama_cpp_INCLUDE, see the Makefile).
#
# A portable build (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) makes one CPU backend library per x86-64
# variant, libggml-cpu-<variant>.so, and ggml loads the best one for the CPU at run time. llama-cpp-python
# installs only the libraries it names, so without this the wheel would hold no CPU backend at all.
# Deferred to the end of the top directory, when every ggml target exists.
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL xnai_install_cpu_variants)

function(xnai_install_cpu_variants)
    foreach(variant x64 sse42 sandybridge ivybridge piledriver haswell skylakex cannonlake cascadelake
                    icelake cooperlake zen4 alderlake sapphirerapids)
        set(target ggml-cpu-${variant})
        if(TARGET ${target})
            set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH TRUE)
            install(TARGETS ${target}
                LIBRARY DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib
                RUNTIME DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
        endif()
    endforeach()
endfunction()
