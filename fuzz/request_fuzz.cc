// libFuzzer target: validation of the retrieval requests (kvrecall.v1.Retrieval)
// from untrusted bytes. Byte 0 picks the RPC; the rest is parsed as its
// request message; when bit 7 of byte 0 is set, the request's context is
// replaced by a real open context, so that the checks behind the context
// lookup are reached too. Each call goes through an in-process server
// (service/rpc Server over a real store and retrieval service, no network)
// holding one model and a context of 4 spans. A crash, a sanitizer report or
// a hang is a finding; any status is fine.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>

#include "grpcpp/grpcpp.h"
#include "kvrecall/v1/retrieval.grpc.pb.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "service/store/store_test_util.h"
#include "service/store/tiered_store.h"

namespace {

namespace v1 = ::kvrecall::v1;
namespace store = ::kvrecall::store;

struct Fixture {
  std::unique_ptr<kvrecall::rpc::Server> server;
  std::unique_ptr<v1::Retrieval::Stub> stub;
  std::string context;  // bytes of the open context's id
};

Fixture* Get() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    store::ModelGeometry g;
    g.model_id = "m";
    g.num_layers = 2;
    g.num_q_heads = 4;
    g.num_kv_heads = 2;
    g.head_dim = 8;
    g.dtype = kvrecall::DType::kF32;
    g.block_tokens = 16;
    kvrecall::rpc::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.store.data_dir =
        (std::filesystem::temp_directory_path() / "kvrecall-request-fuzz").string();
    std::filesystem::remove_all(options.store.data_dir);
    options.store.memory_capacity_bytes = 64 << 20;
    options.store.disk_capacity_bytes = 0;
    options.store.rocksdb_capacity_bytes = 0;
    options.require_token_ids = false;
    std::vector<store::StoredSpan> chain;
    auto open = [&](const store::TieredStoreOptions& o)
        -> absl::StatusOr<std::unique_ptr<store::TieredStore>> {
      auto s = store::TieredStore::Open(o);
      if (!s.ok()) return s;
      if (absl::Status st = (*s)->RegisterModel(g); !st.ok()) return st;
      std::mt19937_64 rng(1);
      chain = store::testing::MakeChain(g, 4, rng);
      for (auto& span : chain) {
        // Finite keys: index builds read them.
        for (size_t i = 0; i + 4 <= span.payload.size(); i += 4) {
          const float x = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 1000.0f;
          std::memcpy(span.payload.data() + i, &x, 4);
        }
        span.meta.payload_checksum = kvrecall::Checksum64(span.payload);
        if (auto put = (*s)->Put(span, store::PutOptions{}); !put.ok()) return put.status();
      }
      return s;
    };
    auto server = kvrecall::rpc::Server::Create(
        options, open,
        {kvrecall::rpc::RetrievalServiceFactory(kvrecall::retrieval::RetrievalOptions(),
                                                kvrecall::rpc::RetrievalRpcOptions())});
    if (!server.ok()) abort();
    fx->server = std::move(server).value();
    fx->stub = v1::Retrieval::NewStub(fx->server->InProcessChannel());
    v1::OpenContextRequest req;
    req.set_model_id("m");
    for (const auto& s : chain) req.add_chain(s.key.hash.ToBytes());
    v1::OpenContextResponse resp;
    grpc::ClientContext ctx;
    if (!fx->stub->OpenContext(&ctx, req, &resp).ok()) abort();
    fx->context = resp.context();
    // Shut the server down before the leak check at exit: its worker threads
    // would otherwise still hold what they allocated.
    std::atexit([] {
      Get()->stub.reset();
      Get()->server.reset();
    });
    return fx;
  }();
  return f;
}

template <typename Req>
bool Parse(absl::string_view in, bool real_context, Req* req) {
  if (!req->ParseFromArray(in.data(), static_cast<int>(in.size()))) return false;
  if (real_context) req->set_context(Get()->context);
  return true;
}

void Deadline(grpc::ClientContext* c) {
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  Fixture* f = Get();
  const bool real = (data[0] & 0x80) != 0;
  const absl::string_view in(reinterpret_cast<const char*>(data) + 1, size - 1);
  grpc::ClientContext c;
  Deadline(&c);
  switch (data[0] % 9) {
    case 0: {
      v1::AttendRequest r;
      v1::AttendResponse out;
      if (Parse(in, real, &r)) (void)f->stub->Attend(&c, r, &out);
      break;
    }
    case 1: {
      v1::SearchRequest r;
      v1::SearchResponse out;
      if (Parse(in, real, &r)) (void)f->stub->Search(&c, r, &out);
      break;
    }
    case 2: {
      v1::AppendTokensRequest r;
      v1::AppendTokensResponse out;
      if (!Parse(in, real, &r)) break;
      // Past the next position: refused after every check of the request
      // itself, so the shared context never grows.
      r.set_expected_position(int64_t{1} << 40);
      (void)f->stub->AppendTokens(&c, r, &out);
      break;
    }
    case 3: {
      v1::AddQueriesRequest r;
      v1::AddQueriesResponse out;
      if (!Parse(in, real, &r)) break;
      auto w = f->stub->AddQueries(&c, &out);
      w->Write(r);
      w->WritesDone();
      (void)w->Finish();
      break;
    }
    case 4: {
      v1::GatherKvRequest r;
      if (!Parse(in, real, &r)) break;
      auto reader = f->stub->GatherKv(&c, r);
      v1::GatherKvResponse out;
      while (reader->Read(&out)) {
      }
      (void)reader->Finish();
      break;
    }
    case 5: {
      v1::OpenContextRequest r;
      v1::OpenContextResponse out;
      if (!r.ParseFromArray(in.data(), static_cast<int>(in.size()))) break;
      if (f->stub->OpenContext(&c, r, &out).ok() && out.context() != f->context) {
        grpc::ClientContext close;
        v1::CloseContextRequest cr;
        cr.set_context(out.context());
        v1::CloseContextResponse cout;
        (void)f->stub->CloseContext(&close, cr, &cout);
      }
      break;
    }
    case 6: {
      v1::ListIndexesRequest r;
      v1::ListIndexesResponse out;
      if (Parse(in, real, &r)) (void)f->stub->ListIndexes(&c, r, &out);
      break;
    }
    case 7: {
      v1::DeleteIndexRequest r;
      v1::DeleteIndexResponse out;
      if (Parse(in, real, &r)) (void)f->stub->DeleteIndex(&c, r, &out);
      break;
    }
    case 8: {
      v1::GetOperationRequest r;
      v1::Operation out;
      if (r.ParseFromArray(in.data(), static_cast<int>(in.size()))) {
        (void)f->stub->GetOperation(&c, r, &out);
      }
      break;
    }
  }
  return 0;
}
