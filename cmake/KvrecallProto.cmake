# kvrecall_proto_library(NAME proto PROTOS kvrecall/v1/a.proto ... [PROTO_ROOT dir])
#
# Generates C++ messages and gRPC services (protoc + grpc_cpp_plugin) into the
# build tree and wraps them in the library kvrecall::<NAME>. Also generates the
# Python messages and stubs (protoc + grpc_python_plugin, never grpc_tools)
# into ${PROJECT_BINARY_DIR}/python, as the package path of the .proto files
# (kvrecall/v1/*_pb2.py); target <NAME>_python builds them.
find_program(KVRECALL_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
find_program(KVRECALL_GRPC_PYTHON_PLUGIN grpc_python_plugin REQUIRED)

function(kvrecall_proto_library)
  cmake_parse_arguments(KVR "" "NAME;PROTO_ROOT" "PROTOS;DEPS" ${ARGN})
  if(NOT KVR_PROTO_ROOT)
    set(KVR_PROTO_ROOT ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  set(_cpp_out ${PROJECT_BINARY_DIR})
  set(_py_out ${PROJECT_BINARY_DIR}/python)
  file(MAKE_DIRECTORY ${_py_out})
  set(_srcs)
  set(_hdrs)
  set(_pys)
  foreach(_proto ${KVR_PROTOS})
    get_filename_component(_dir ${_proto} DIRECTORY)
    get_filename_component(_stem ${_proto} NAME_WE)
    set(_base ${_cpp_out}/${_dir}/${_stem})
    list(APPEND _srcs ${_base}.pb.cc ${_base}.grpc.pb.cc)
    list(APPEND _hdrs ${_base}.pb.h ${_base}.grpc.pb.h ${_base}_mock.grpc.pb.h)
    list(APPEND _pys ${_py_out}/${_dir}/${_stem}_pb2.py ${_py_out}/${_dir}/${_stem}_pb2_grpc.py)
    set(_abs ${KVR_PROTO_ROOT}/${_proto})
    add_custom_command(
      OUTPUT ${_base}.pb.cc ${_base}.pb.h ${_base}.grpc.pb.cc ${_base}.grpc.pb.h
             ${_base}_mock.grpc.pb.h
      COMMAND protobuf::protoc
        -I ${KVR_PROTO_ROOT} -I ${Protobuf_INCLUDE_DIR}
        --cpp_out=${_cpp_out}
        --grpc_out=generate_mock_code=true:${_cpp_out}
        --plugin=protoc-gen-grpc=${KVRECALL_GRPC_CPP_PLUGIN}
        ${_abs}
      DEPENDS ${_abs} protobuf::protoc
      COMMENT "protoc (C++) ${_proto}"
      VERBATIM)
    add_custom_command(
      OUTPUT ${_py_out}/${_dir}/${_stem}_pb2.py ${_py_out}/${_dir}/${_stem}_pb2_grpc.py
      COMMAND protobuf::protoc
        -I ${KVR_PROTO_ROOT} -I ${Protobuf_INCLUDE_DIR}
        --python_out=${_py_out}
        --grpc_python_out=${_py_out}
        --plugin=protoc-gen-grpc_python=${KVRECALL_GRPC_PYTHON_PLUGIN}
        ${_abs}
      DEPENDS ${_abs} protobuf::protoc
      COMMENT "protoc (Python) ${_proto}"
      VERBATIM)
  endforeach()
  add_library(kvrecall_${KVR_NAME} STATIC ${_srcs} ${_hdrs})
  target_include_directories(kvrecall_${KVR_NAME} PUBLIC ${_cpp_out})
  target_link_libraries(kvrecall_${KVR_NAME} PUBLIC protobuf::libprotobuf gRPC::grpc++ ${KVR_DEPS})
  add_library(kvrecall::${KVR_NAME} ALIAS kvrecall_${KVR_NAME})
  add_custom_target(${KVR_NAME}_python ALL DEPENDS ${_pys})
endfunction()
