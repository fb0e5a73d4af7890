// The allocation as a 0/1 integer program solved by GLPK (docs/allocation.md,
// research/bit-allocation.md §1 and §3.2.4):
//   minimise Σ loss[u][c] z[u][c]   s.t.  Σ_c z[u][c] = 1 (each unit),  Σ bits[u][c] z[u][c] <= B,
// z binary; +inf-loss candidates get no column. The certificate records GLPK's MIP status, the LP
// relaxation's value (a lower bound) and the relative gap between them.
#include <glpk.h>

#include <cmath>
#include <memory>

#include <fmt/format.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::AllocationProblem;

const char* mip_status_text(int s) {
  switch (s) {
    case GLP_OPT: return "optimal";
    case GLP_FEAS: return "feasible";
    case GLP_NOFEAS: return "infeasible";
    case GLP_UNDEF: return "undefined";
  }
  return "unknown";
}

class IlpAllocator : public ptqlab::Allocator {
 public:
  explicit IlpAllocator(const ptqlab::Params& p)
      : time_limit_ms_(static_cast<int>(p.get_real("time_limit") * 1000)), mip_gap_(p.get_real("mip_gap")) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    std::unique_ptr<glp_prob, void (*)(glp_prob*)> lp(glp_create_prob(), glp_delete_prob);
    glp_set_obj_dir(lp.get(), GLP_MIN);
    const int U = static_cast<int>(p.cost.size());
    glp_add_rows(lp.get(), U + 1);
    for (int u = 0; u < U; ++u) glp_set_row_bnds(lp.get(), u + 1, GLP_FX, 1.0, 1.0);
    glp_set_row_bnds(lp.get(), U + 1, GLP_UP, 0.0, static_cast<double>(p.budget));
    // Columns; the constraint matrix in triplet form (GLPK arrays are 1-based).
    std::vector<int> ia(1), ja(1);
    std::vector<double> ar(1);
    std::vector<std::pair<int, int>> column_of;  // column - 1 -> (unit, candidate)
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < static_cast<int>(p.cost[u].size()); ++c) {
        if (!std::isfinite(p.loss[u][c])) continue;
        const int j = glp_add_cols(lp.get(), 1);
        glp_set_col_kind(lp.get(), j, GLP_BV);
        glp_set_obj_coef(lp.get(), j, p.loss[u][c]);
        ia.push_back(u + 1), ja.push_back(j), ar.push_back(1.0);
        ia.push_back(U + 1), ja.push_back(j), ar.push_back(static_cast<double>(p.cost[u][c]));
        column_of.emplace_back(u, c);
      }
    glp_load_matrix(lp.get(), static_cast<int>(ia.size()) - 1, ia.data(), ja.data(), ar.data());

    glp_smcp lp_params;
    glp_init_smcp(&lp_params);
    lp_params.msg_lev = GLP_MSG_OFF;
    if (glp_simplex(lp.get(), &lp_params) != 0 || glp_get_status(lp.get()) != GLP_OPT)
      throw ptqlab::Error("ilp allocator: GLPK's LP relaxation failed");
    const double lp_bound = glp_get_obj_val(lp.get());

    glp_iocp mip;
    glp_init_iocp(&mip);
    mip.msg_lev = GLP_MSG_OFF;
    mip.mip_gap = mip_gap_;
    if (time_limit_ms_ > 0) mip.tm_lim = time_limit_ms_;
    const int rc = glp_intopt(lp.get(), &mip);
    const int status = glp_mip_status(lp.get());
    if ((rc != 0 && rc != GLP_ETMLIM && rc != GLP_EMIPGAP) || (status != GLP_OPT && status != GLP_FEAS))
      throw ptqlab::Error(fmt::format("ilp allocator: GLPK found no integer solution (glp_intopt {}, status {})", rc,
                                      mip_status_text(status)));
    ptqlab::Allocation a;
    a.choice.assign(U, -1);
    for (std::size_t j = 0; j < column_of.size(); ++j)
      if (glp_mip_col_val(lp.get(), static_cast<int>(j) + 1) > 0.5) a.choice[column_of[j].first] = column_of[j].second;
    for (int u = 0; u < U; ++u)
      if (a.choice[u] < 0) throw ptqlab::Error("ilp allocator: GLPK's solution leaves a unit without a candidate");
    ptqlab::finish_allocation(p, a);
    if (a.bits > p.budget) throw std::logic_error("ilp allocator: GLPK's solution exceeds the budget");
    a.status = fmt::format("{} (GLPK {})", mip_status_text(status), glp_version());
    a.lower_bound = std::min(lp_bound, a.loss);
    a.info["lp_bound"] = lp_bound;
    a.info["gap"] = a.loss > 0 ? (a.loss - lp_bound) / a.loss : 0.0;
    a.info["glpk_intopt_rc"] = rc;
    a.info["columns"] = static_cast<double>(column_of.size());
    return a;
  }

 private:
  int time_limit_ms_;
  double mip_gap_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "ilp";
  schema.description = "0/1 integer program solved by GLPK's branch and cut (status, LP bound and gap recorded)";
  schema.params = {
      {"time_limit", ptqlab::ParamType::real, 60.0, "GLPK time limit in seconds (0: none)", 0.0, 1e6, {}},
      {"mip_gap", ptqlab::ParamType::real, 0.0, "relative MIP gap at which GLPK may stop (0: prove optimality)", 0.0,
       1.0, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<IlpAllocator>(p); });
}
