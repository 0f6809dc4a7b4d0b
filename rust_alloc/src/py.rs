//! PyO3 bindings: conversions, GIL release and error mapping only.

use pyo3::prelude::*;

#[pymodule]
fn _alloc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
