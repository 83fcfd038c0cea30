//! Test-only helpers shared by the library's unit tests.

/// Environment variable naming capabilities a test run must have, separated
/// by commas (`MOE_INSPECT_REQUIRE=avx512bf16,cuda`): on a machine that has
/// them, a test that would skip for their lack fails instead.
pub const REQUIRE_VAR: &str = "MOE_INSPECT_REQUIRE";

/// Called by a test that cannot run here for lack of `capability`: says so
/// on stderr (the test then returns, passing) or, when [`REQUIRE_VAR`] names
/// the capability, fails the test.
pub fn skip(test: &str, capability: &str, why: &str) {
    skip_under(
        &std::env::var(REQUIRE_VAR).unwrap_or_default(),
        test,
        capability,
        why,
    )
}

fn skip_under(required: &str, test: &str, capability: &str, why: &str) {
    if required.split(',').any(|c| c.trim() == capability) {
        panic!("{test}: {why}, but {REQUIRE_VAR} requires `{capability}`");
    }
    eprintln!("{test}: SKIPPED ({why}; set {REQUIRE_VAR}={capability} to make this a failure)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_required_capability_turns_the_skip_into_a_failure() {
        skip_under("", "t", "cuda", "no CUDA device");
        skip_under("avx512bf16", "t", "cuda", "no CUDA device");
        let failed = std::panic::catch_unwind(|| {
            skip_under("avx512bf16, cuda", "t", "cuda", "no CUDA device")
        });
        assert!(failed.is_err());
    }
}
