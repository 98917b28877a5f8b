#include "common/metrics.h"

#include "gtest/gtest.h"

namespace kvrecall {
namespace {

TEST(MetricsTest, HistogramPercentilesWithinBucketError) {
  LatencyHistogram h;
  for (int i = 1; i <= 1000; ++i) h.Record(i);
  const auto s = h.Read();
  EXPECT_EQ(s.count, 1000);
  EXPECT_NEAR(s.p50_us, 500, 500 * 0.1);
  EXPECT_NEAR(s.p99_us, 990, 990 * 0.1);
  EXPECT_DOUBLE_EQ(s.max_us, 1000);
  EXPECT_NEAR(s.mean_us(), 500.5, 0.01);
}

TEST(MetricsTest, RegistryReturnsSameMetricAndExports) {
  MetricsRegistry r;
  Counter* c = r.GetCounter("kvrecall_rpc_total", "rpc=\"Put\"");
  EXPECT_EQ(c, r.GetCounter("kvrecall_rpc_total", "rpc=\"Put\""));
  c->Increment(3);
  r.GetGauge("kvrecall_bytes")->Set(42);
  r.GetHistogram("kvrecall_rpc_seconds", "rpc=\"Put\"")->Record(1500);
  const std::string text = r.PrometheusText();
  EXPECT_NE(text.find("kvrecall_rpc_total{rpc=\"Put\"} 3"), std::string::npos) << text;
  EXPECT_NE(text.find("kvrecall_bytes 42"), std::string::npos) << text;
  EXPECT_NE(text.find("kvrecall_rpc_seconds_count{rpc=\"Put\"} 1"), std::string::npos) << text;
}

}  // namespace
}  // namespace kvrecall
