// Python bindings of the feature store (csrc/engine/store/store.h). Buffers cross as the
// buffer protocol (numpy arrays, memoryviews, numpy views of torch tensors) so this module
// stays torch-free; autokd/store/ wraps them into torch tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/registry.h"
#include "engine/store/store.h"

namespace py = pybind11;
using namespace autokd::store;

namespace {

// A C-contiguous view of a Python buffer, released on scope exit.
class ContiguousBuffer {
 public:
  ContiguousBuffer(const py::handle& obj, bool writable, const std::string& what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      PyErr_Clear();
      throw std::invalid_argument("autokd store: expected " + what + " to be a C-contiguous" +
                                  (writable ? " writable" : "") + " buffer (numpy array, memoryview), got " +
                                  std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    held_ = true;
  }
  ~ContiguousBuffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  ContiguousBuffer(const ContiguousBuffer&) = delete;
  ContiguousBuffer(ContiguousBuffer&& o) noexcept : view_(o.view_), held_(o.held_) { o.held_ = false; }
  void* data() const { return view_.buf; }
  uint64_t nbytes() const { return uint64_t(view_.len); }
  uint64_t itemsize() const { return uint64_t(view_.itemsize); }
  std::string format() const { return view_.format ? view_.format : "B"; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

std::vector<Field> to_fields(const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>>& in) {
  std::vector<Field> out;
  for (const auto& [name, dtype, shape] : in) out.push_back(Field{name, dtype_from_name(dtype), shape});
  return out;
}

py::list from_fields(const std::vector<Field>& fields) {
  py::list out;
  for (const auto& f : fields) out.append(py::make_tuple(f.name, dtype_name(f.dtype), f.shape));
  return out;
}

void check_size(const ContiguousBuffer& b, uint64_t expected, const std::string& what) {
  if (b.nbytes() != expected)
    throw std::invalid_argument("autokd store: expected " + what + " of " + std::to_string(expected) +
                                " bytes, got " + std::to_string(b.nbytes()));
}

ContiguousBuffer int64_buffer(const py::handle& obj, const std::string& what) {
  ContiguousBuffer b(obj, false, what);
  std::string f = b.format();
  if (b.itemsize() != 8 || (f != "l" && f != "q" && f != "<q" && f != "=q" && f != "<l" && f != "=l"))
    throw std::invalid_argument("autokd store: expected " + what + " of dtype int64, got format '" + f + "'");
  return b;
}

// A named function: the macro cannot take a lambda whose body has top-level commas.
void bind_store(py::module_& m) {
  static py::exception<StoreError> store_error(m, "StoreError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StoreError& e) {
      py::object exc = py::reinterpret_borrow<py::object>(store_error)(e.what());
      exc.attr("path") = e.path();
      exc.attr("check") = e.check();
      exc.attr("expected") = e.expected();
      exc.attr("found") = e.found();
      PyErr_SetObject(store_error.ptr(), exc.ptr());
    } catch (const StoreIOError& e) {
      // OSError(errno, strerror, filename): Python picks the subclass (PermissionError, ...)
      py::tuple args = py::make_tuple(e.error(), std::string(std::strerror(e.error())) + " (" +
                                      e.call() + ")", e.path());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });
  m.attr("STORE_FORMAT_VERSION") = kFormatVersion;
  m.def(
      "xxh64",
      [](const py::handle& data, uint64_t seed) {
        ContiguousBuffer b(data, false, "data");
        return xxh64(b.data(), b.nbytes(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of a buffer: the store's checksum (checksum.h).");

  py::class_<Writer>(m, "StoreWriter", "Streams records of a feature store file; see store.h.")
      .def(py::init([](const std::string& path,
                       const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>>& fields,
                       uint64_t num_samples, uint64_t num_views, const std::string& teacher_hash,
                       const std::string& dataset_id, const std::string& augment_id, uint64_t chunk_bytes) {
             WriterOptions o;
             o.path = path;
             o.fields = to_fields(fields);
             o.num_samples = num_samples;
             o.num_views = num_views;
             o.teacher_hash = teacher_hash;
             o.dataset_id = dataset_id;
             o.augment_id = augment_id;
             o.chunk_bytes = chunk_bytes;
             return std::make_unique<Writer>(std::move(o));
           }),
           py::arg("path"), py::arg("fields"), py::arg("num_samples"), py::arg("num_views"),
           py::arg("teacher_hash"), py::arg("dataset_id"), py::arg("augment_id"),
           py::arg("chunk_bytes") = uint64_t(1) << 20)
      .def(
          "append",
          [](Writer& w, const py::list& buffers, uint64_t n) {
            std::vector<ContiguousBuffer> held;
            std::vector<const void*> ptrs;
            held.reserve(buffers.size());
            for (size_t f = 0; f < buffers.size(); ++f) {
              held.emplace_back(buffers[f], false, "field buffer " + std::to_string(f));
              ptrs.push_back(held.back().data());
            }
            py::gil_scoped_release release;
            w.append(ptrs, n);
          },
          py::arg("buffers"), py::arg("n"),
          "Append the next n records; buffers[f] holds n records of field f in its stored dtype.")
      .def("finish", [](Writer& w) {
        py::gil_scoped_release release;
        w.finish();
      })
      .def("abort", &Writer::abort)
      .def_property_readonly("records_written", &Writer::records_written)
      .def_property_readonly("total_records", &Writer::total_records)
      .def_property_readonly("partial_path", &Writer::partial_path);

  py::class_<Reader, std::shared_ptr<Reader>>(m, "StoreReader", "Read-only mapped feature store; see store.h.")
      .def(py::init([](const std::string& path, const std::string& expect_teacher_hash,
                       const std::string& expect_dataset_id,
                       const std::optional<std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>>>&
                           expect_fields,
                       unsigned num_threads, const std::string& verify) {
             ReaderOptions o;
             o.path = path;
             o.expect_teacher_hash = expect_teacher_hash;
             o.expect_dataset_id = expect_dataset_id;
             if (expect_fields) o.expect_fields = to_fields(*expect_fields);
             o.num_threads = num_threads;
             o.verify = verify_from_name(verify);
             py::gil_scoped_release release;
             return std::make_shared<Reader>(std::move(o));
           }),
           py::arg("path"), py::arg("expect_teacher_hash") = "", py::arg("expect_dataset_id") = "",
           py::arg("expect_fields") = py::none(), py::arg("num_threads") = 4,
           py::arg("verify") = "touch")
      .def(
          "gather",
          [](const Reader& r, const py::handle& samples, const py::handle& views, const py::list& outs) {
            ContiguousBuffer s = int64_buffer(samples, "indices");
            ContiguousBuffer v = int64_buffer(views, "views");
            uint64_t n = s.nbytes() / 8;
            check_size(v, n * 8, "views (one per index)");
            if (outs.size() != r.fields().size())
              throw std::invalid_argument("autokd store gather: expected " + std::to_string(r.fields().size()) +
                                          " output buffers, got " + std::to_string(outs.size()));
            std::vector<ContiguousBuffer> held;
            std::vector<void*> ptrs;
            held.reserve(outs.size());
            for (size_t f = 0; f < outs.size(); ++f) {
              held.emplace_back(outs[f], true, "output for field '" + r.fields()[f].name + "'");
              check_size(held.back(), n * r.fields()[f].bytes(), "output for field '" + r.fields()[f].name + "'");
              ptrs.push_back(held.back().data());
            }
            py::gil_scoped_release release;
            r.gather(static_cast<const int64_t*>(s.data()), static_cast<const int64_t*>(v.data()), n, ptrs);
          },
          py::arg("indices"), py::arg("views"), py::arg("outs"),
          "Copy records (indices[b], views[b]) into outs[f] (n * field bytes each), GIL released.")
      .def("verify", [](const Reader& r) {
        py::gil_scoped_release release;
        r.verify();
      })
      .def_property_readonly("path", &Reader::path)
      .def_property_readonly("num_chunks", &Reader::num_chunks)
      .def_property_readonly("chunks_checked", &Reader::chunks_checked,
                             "Data chunks that have matched their checksum in this process.")
      .def_property_readonly("fields", [](const Reader& r) { return from_fields(r.fields()); })
      .def_property_readonly("field_bytes",
                             [](const Reader& r) {
                               std::vector<uint64_t> b;
                               for (const auto& f : r.fields()) b.push_back(f.bytes());
                               return b;
                             })
      .def_property_readonly("record_bytes", [](const Reader& r) { return r.layout().record_bytes; })
      .def_property_readonly("num_samples", &Reader::num_samples)
      .def_property_readonly("num_views", &Reader::num_views)
      .def_property_readonly("chunk_bytes", &Reader::chunk_bytes)
      .def_property_readonly("data_offset", &Reader::data_offset)
      .def_property_readonly("file_bytes", &Reader::file_bytes)
      .def_property_readonly("teacher_hash", &Reader::teacher_hash)
      .def_property_readonly("dataset_id", &Reader::dataset_id)
      .def_property_readonly("augment_id", &Reader::augment_id);
}

}  // namespace

AUTOKD_ENGINE_BINDING(store, bind_store);
