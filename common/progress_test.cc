#include "common/progress.h"

#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

Progress At(const std::string& stage, double fraction, int64_t done = 0, int64_t total = 0) {
  Progress p;
  p.stage = stage;
  p.fraction = fraction;
  p.done = done;
  p.total = total;
  return p;
}

TEST(StageProgressTest, LinesModePrintsOneLinePerStage) {
  std::ostringstream out;
  StageProgress progress(&out, "build roar", ProgressMode::kLines);
  EXPECT_TRUE(progress.Update(At("knn", 0.0, 0, 100)));
  EXPECT_TRUE(progress.Update(At("knn", 0.3, 30, 100)));
  EXPECT_TRUE(progress.Update(At("knn", 0.5, 50, 100)));
  EXPECT_TRUE(progress.Update(At("connectivity", 0.9)));
  progress.Clear();
  progress.Finish();
  EXPECT_EQ(out.str(), "build roar:   0% knn (100 steps)\nbuild roar:  90% connectivity\n");
}

TEST(StageProgressTest, BarModeRedrawsInPlaceAndEndsTheLine) {
  std::ostringstream out;
  StageProgress progress(&out, "search", ProgressMode::kBar);
  progress.Update(At("sweep", 0.25, 1, 4));
  progress.Update(At("rerank", 0.5, 2, 4));  // a new stage draws at once
  progress.Clear();
  progress.Finish();
  const std::string text = out.str();
  EXPECT_THAT(text, HasSubstr("\rsearch [######------------------]  25%  sweep  1/4"));
  EXPECT_THAT(text, HasSubstr("\rsearch [############------------]  50%  rerank  2/4"));
  EXPECT_THAT(text, HasSubstr("\r\x1b[K"));
  EXPECT_THAT(text, HasSubstr("100%  rerank  4/4\x1b[K\n"));
  EXPECT_EQ(text.back(), '\n');
}

TEST(StageProgressTest, NoneModePrintsNothing) {
  std::ostringstream out;
  StageProgress progress(&out, "x", ProgressMode::kNone);
  progress.Update(At("a", 0.5));
  progress.Clear();
  progress.Finish();
  EXPECT_THAT(out.str(), Not(HasSubstr("x")));
  EXPECT_TRUE(out.str().empty());
}

TEST(StageProgressTest, FinishWithoutUpdatesPrintsNothing) {
  std::ostringstream out;
  StageProgress progress(&out, "x", ProgressMode::kBar);
  progress.Finish();
  EXPECT_TRUE(out.str().empty());
}

}  // namespace
}  // namespace kvrecall
