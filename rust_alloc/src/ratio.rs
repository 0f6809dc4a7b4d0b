//! Exact policy ratios: decimal text in, integer fraction out, no floats.

/// The most decimal places a ratio may have (the contract's limit for decimal strings).
pub const RATIO_DECIMALS_MAX: usize = 18;

/// A ratio `num / den` in [0, 1], with `den` > 0. Kept unreduced: only products matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ratio {
    num: u64,
    den: u64,
}

/// Why a ratio's text was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatioProblem {
    /// Not of the form `digits[.digits]` with at most 18 decimal places.
    Malformed,
    /// Well formed but above 1.
    AboveOne,
    /// Zero where the ratio must be positive (the coverage ratio).
    Zero,
}

impl Ratio {
    /// The ratio `num / den`; `None` unless 0 <= num <= den and den > 0.
    pub fn new(num: u64, den: u64) -> Option<Self> {
        (den > 0 && num <= den).then_some(Self { num, den })
    }

    /// Parses `digits[.digits]` (at most 18 places, no sign, exponent or spaces) exactly.
    pub fn parse(text: &str) -> Result<Self, RatioProblem> {
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (text, ""),
        };
        let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let fraction_ok = fraction.len() <= RATIO_DECIMALS_MAX
            && digits_only(fraction)
            && (fraction.is_empty() != text.contains('.'));
        if whole.is_empty() || !digits_only(whole) || !fraction_ok {
            return Err(RatioProblem::Malformed);
        }
        // Leading zeros are harmless; anything whose whole part is not 0 or 1 is above one.
        let whole = whole.trim_start_matches('0');
        let whole_value: u64 = match whole {
            "" => 0,
            "1" => 1,
            _ => return Err(RatioProblem::AboveOne),
        };
        let den = 10u64.pow(fraction.len() as u32);
        let fraction_value: u64 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| RatioProblem::Malformed)?
        };
        let num = whole_value * den + fraction_value;
        Self::new(num, den).ok_or(RatioProblem::AboveOne)
    }

    pub fn is_zero(self) -> bool {
        self.num == 0
    }

    /// `self * x` rounded to the nearest integer, halves up. Never exceeds `x`.
    pub fn mul_round_half_up(self, x: u64) -> u64 {
        let product = u128::from(x) * u128::from(self.num);
        let den = u128::from(self.den);
        let (quotient, remainder) = (product / den, product % den);
        let rounded = quotient + u128::from(2 * remainder >= den);
        // Fits: rounded <= x because num <= den.
        rounded as u64
    }

    /// `ceil(self * x)` exactly, for any `x` up to `u128::MAX`. Never exceeds `x`.
    pub fn mul_ceil(self, x: u128) -> u128 {
        let (num, den) = (u128::from(self.num), u128::from(self.den));
        // x = a*den + b, so x*num/den = a*num + b*num/den; b*num < 2^128 since both < 2^64.
        let (a, b) = (x / den, x % den);
        a * num + (b * num).div_ceil(den)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Ratio::parse("0.2"), Ok(Ratio { num: 2, den: 10 }));
        assert_eq!(Ratio::parse("1"), Ok(Ratio { num: 1, den: 1 }));
        assert_eq!(
            Ratio::parse("1.000"),
            Ok(Ratio {
                num: 1000,
                den: 1000
            })
        );
        assert_eq!(Ratio::parse("000.5"), Ok(Ratio { num: 5, den: 10 }));
        let tiny = Ratio::parse("0.000000000000000001").unwrap();
        assert_eq!(
            tiny,
            Ratio {
                num: 1,
                den: 1_000_000_000_000_000_000
            }
        );
    }

    #[test]
    fn rejects_malformed_and_out_of_range() {
        for text in [
            "", ".", "1.", ".5", "-0.1", "+0.1", "0.1e1", " 0.1", "0,1", "0.1.1", "nan",
        ] {
            assert_eq!(Ratio::parse(text), Err(RatioProblem::Malformed), "{text:?}");
        }
        assert_eq!(
            Ratio::parse("0.0000000000000000001"),
            Err(RatioProblem::Malformed)
        );
        for text in ["1.000000000000000001", "2", "10", "99999999999999999999999"] {
            assert_eq!(Ratio::parse(text), Err(RatioProblem::AboveOne), "{text:?}");
        }
    }

    #[test]
    fn rounds_half_up_and_ceils() {
        let fifth = Ratio::parse("0.2").unwrap();
        assert_eq!(fifth.mul_round_half_up(1000), 200);
        assert_eq!(fifth.mul_round_half_up(12), 2); // 2.4
        assert_eq!(Ratio::parse("0.5").unwrap().mul_round_half_up(5), 3); // 2.5 -> 3
        assert_eq!(
            Ratio::parse("1").unwrap().mul_round_half_up(u64::MAX),
            u64::MAX
        );
        assert_eq!(fifth.mul_ceil(11), 3);
        assert_eq!(fifth.mul_ceil(10), 2);
        let big = Ratio::new(u64::MAX - 1, u64::MAX).unwrap();
        assert_eq!(
            big.mul_ceil(u128::MAX),
            u128::MAX - u128::MAX / u128::from(u64::MAX)
        );
    }
}
