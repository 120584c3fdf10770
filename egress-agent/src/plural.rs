//! Counts in log lines: "1 rule", "2 rules".

/// `n` and the noun: `one` when `n` is 1, `many` otherwise.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_and_many() {
        assert_eq!(counted(0, "rule", "rules"), "0 rules");
        assert_eq!(counted(1, "rule", "rules"), "1 rule");
        assert_eq!(counted(2, "CIDR entry", "CIDR entries"), "2 CIDR entries");
    }
}
