//! PyO3 bindings: conversions, GIL release and error mapping only.

use numpy::IntoPyArray;
use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::chain::{self, NewEntry};
use crate::decode::{self, DecodeError, Item, PositionColumns};
use crate::liquidation::{self, Exact, Liquidation};
use crate::order;
use crate::{allocate_ranked, AllocError, Allocation, Policy, Positions, Ranking};

pyo3::create_exception!(
    ledger._alloc,
    AllocationError,
    PyValueError,
    "The allocation's input is invalid (the server answers INVALID_ARGUMENT)."
);
pyo3::create_exception!(
    ledger._alloc,
    ColumnLengthError,
    AllocationError,
    "Columns of unequal length."
);
pyo3::create_exception!(
    ledger._alloc,
    DuplicatePositionError,
    AllocationError,
    "A repeated position_id."
);
pyo3::create_exception!(
    ledger._alloc,
    NegativeAmountError,
    AllocationError,
    "A negative loss or balance."
);
pyo3::create_exception!(
    ledger._alloc,
    RatioError,
    AllocationError,
    "A malformed or out-of-range ratio."
);
pyo3::create_exception!(
    ledger._alloc,
    ColumnTypeError,
    AllocationError,
    "A column of the wrong type."
);
pyo3::create_exception!(
    ledger._alloc,
    MalformedMessageError,
    AllocationError,
    "A CycleInput message that is not valid protobuf for its type."
);
pyo3::create_exception!(
    ledger._alloc,
    AccountProfitError,
    AllocationError,
    "Under account ranking, an account's profit beyond int64."
);
pyo3::create_exception!(
    ledger._alloc,
    PositionLimitError,
    PyException,
    "More positions than allowed (the server answers RESOURCE_EXHAUSTED)."
);
pyo3::create_exception!(
    ledger._alloc,
    AllocationInvariantError,
    PyRuntimeError,
    "A result check failed: a bug, not bad input (the server answers INTERNAL)."
);

/// The one mapping from the core's errors to Python exceptions.
fn to_py(error: AllocError) -> PyErr {
    let message = error.to_string();
    match error {
        AllocError::ColumnLengths { .. } => ColumnLengthError::new_err(message),
        AllocError::DuplicatePositionId(_) => DuplicatePositionError::new_err(message),
        AllocError::NegativeLoss(_) | AllocError::NegativeFundBalance(_) => {
            NegativeAmountError::new_err(message)
        }
        AllocError::Ratio { .. } => RatioError::new_err(message),
        AllocError::TooManyPositions { .. } => PositionLimitError::new_err(message),
        AllocError::AccountProfitTooLarge { .. } => AccountProfitError::new_err(message),
        AllocError::InvariantBroken(_) => AllocationInvariantError::new_err(message),
    }
}

/// A read-only view of a C-contiguous buffer of `T`, held for the duration of the call.
struct Column<T: Element> {
    buffer: PyBuffer<T>,
}

impl<T: Element> Column<T> {
    fn get(name: &str, dtype: &str, object: &Bound<'_, PyAny>) -> PyResult<Self> {
        let wrong = || {
            ColumnTypeError::new_err(format!(
                "{name} must be a C-contiguous buffer of {dtype} (e.g. a numpy {dtype} array)"
            ))
        };
        let buffer = PyBuffer::<T>::get(object).map_err(|_| wrong())?;
        if buffer.dimensions() > 1 || buffer.as_slice_ptr().is_none() {
            return Err(wrong());
        }
        Ok(Self { buffer })
    }

    /// The elements. Sound while `self` lives, provided the owner does not mutate the buffer
    /// concurrently (documented in `ledger.alloc`: the columns are read-only during a call).
    fn slice(&self) -> &[T] {
        let pointer = self
            .buffer
            .as_slice_ptr()
            .expect("checked C-contiguous in get");
        // SAFETY: the buffer is held (pinned) by `self.buffer`, contiguous and typed as T.
        unsafe { pointer.as_ref() }
    }
}

fn decode_to_py(error: DecodeError) -> PyErr {
    let message = error.to_string();
    match error {
        DecodeError::Malformed(_) => MalformedMessageError::new_err(message),
        DecodeError::ColumnLengths { .. } => ColumnLengthError::new_err(message),
        DecodeError::TooManyPositions { .. } => PositionLimitError::new_err(message),
        DecodeError::DuplicatePositionId(_) => DuplicatePositionError::new_err(message),
    }
}

/// A cycle's positions, decoded from serialized `CycleInput` messages and kept in Rust.
#[pyclass(module = "ledger._alloc")]
struct CycleInputDecoder {
    columns: PositionColumns,
    positions_max: usize,
}

#[pymethods]
impl CycleInputDecoder {
    #[new]
    fn new(positions_max: usize) -> Self {
        Self {
            columns: PositionColumns::default(),
            positions_max,
        }
    }

    /// ("header", cycle_id, currency), ("positions", rows) or ("empty",).
    fn feed<'py>(&mut self, py: Python<'py>, message: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
        let item = self
            .columns
            .feed(message, self.positions_max)
            .map_err(decode_to_py)?;
        match item {
            Item::Header { cycle_id, currency } => ("header", cycle_id, currency).into_pyobject(py),
            Item::Positions { rows } => ("positions", rows).into_pyobject(py),
            Item::Empty => ("empty",).into_pyobject(py),
        }
    }

    #[getter]
    fn positions_total(&self) -> usize {
        self.columns.len()
    }

    fn __len__(&self) -> usize {
        self.columns.len()
    }

    fn input_digest(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.columns.input_digest())
            .map_err(decode_to_py)
    }

    /// Copies of the three columns as received (position_id, account_id, pnl): what a
    /// close keeps of its input for the statements of its positions.
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let positions = self.columns.positions();
        let (ids, accounts, pnls) = py.detach(|| {
            (
                positions.position_id.to_vec(),
                positions.account_id.to_vec(),
                positions.pnl.to_vec(),
            )
        });
        (
            ids.into_pyarray(py),
            accounts.into_pyarray(py),
            pnls.into_pyarray(py),
        )
            .into_pyobject(py)
    }

    #[pyo3(signature = (loss, fund_balance, insurance_share, coverage_ratio, ranking = 1))]
    fn allocate<'py>(
        &self,
        py: Python<'py>,
        loss: i64,
        fund_balance: i64,
        insurance_share: &str,
        coverage_ratio: &str,
        ranking: i64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let policy = policy(insurance_share, coverage_ratio)?;
        let ranking = ranking_of(ranking)?;
        let positions = self.columns.positions();
        let allocation =
            py.detach(|| allocate_ranked(loss, fund_balance, policy, ranking, positions));
        result_to_py(py, allocation.map_err(to_py)?)
    }
}

/// Serialized `AllocationChunk` messages of at most `rows_per_chunk` rows each.
#[pyfunction]
fn encode_allocation_chunks<'py>(
    py: Python<'py>,
    position_id: &Bound<'py, PyAny>,
    account_id: &Bound<'py, PyAny>,
    pnl: &Bound<'py, PyAny>,
    amount: &Bound<'py, PyAny>,
    rows_per_chunk: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    if rows_per_chunk == 0 {
        return Err(AllocationError::new_err("rows_per_chunk must be positive"));
    }
    let position_id = Column::<u64>::get("position_id", "uint64", position_id)?;
    let account_id = Column::<u64>::get("account_id", "uint64", account_id)?;
    let pnl = Column::<i64>::get("pnl", "int64", pnl)?;
    let amount = Column::<i64>::get("amount", "int64", amount)?;
    let lengths = [
        position_id.slice().len(),
        account_id.slice().len(),
        pnl.slice().len(),
    ];
    if lengths
        .iter()
        .chain([&amount.slice().len()])
        .any(|&len| len != lengths[0])
    {
        return Err(ColumnLengthError::new_err(
            "allocation columns have unequal lengths",
        ));
    }
    let (ids, accounts, pnls, amounts) = (
        position_id.slice(),
        account_id.slice(),
        pnl.slice(),
        amount.slice(),
    );
    let chunks = py
        .detach(|| decode::encode_allocation_chunks(ids, accounts, pnls, amounts, rows_per_chunk));
    Ok(chunks.iter().map(|chunk| PyBytes::new(py, chunk)).collect())
}

/// The digest of a cycle's allocation rows (see `decode::allocations_digest`).
#[pyfunction]
fn allocations_digest<'py>(
    py: Python<'py>,
    position_id: &Bound<'py, PyAny>,
    account_id: &Bound<'py, PyAny>,
    pnl: &Bound<'py, PyAny>,
    amount: &Bound<'py, PyAny>,
) -> PyResult<String> {
    let position_id = Column::<u64>::get("position_id", "uint64", position_id)?;
    let account_id = Column::<u64>::get("account_id", "uint64", account_id)?;
    let pnl = Column::<i64>::get("pnl", "int64", pnl)?;
    let amount = Column::<i64>::get("amount", "int64", amount)?;
    let (ids, accounts, pnls, amounts) = (
        position_id.slice(),
        account_id.slice(),
        pnl.slice(),
        amount.slice(),
    );
    if [accounts.len(), pnls.len(), amounts.len()]
        .iter()
        .any(|&len| len != ids.len())
    {
        return Err(ColumnLengthError::new_err(
            "allocation columns have unequal lengths",
        ));
    }
    Ok(py.detach(|| decode::allocations_digest(ids, accounts, pnls, amounts)))
}

/// The allocation rows in the table's order (see `order`): (account_id, position_id, pnl,
/// amount, rank), each column permuted, the rank being each row's index in the input.
#[pyfunction]
fn table_order<'py>(
    py: Python<'py>,
    position_id: &Bound<'py, PyAny>,
    account_id: &Bound<'py, PyAny>,
    pnl: &Bound<'py, PyAny>,
    amount: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let position_id = Column::<u64>::get("position_id", "uint64", position_id)?;
    let account_id = Column::<u64>::get("account_id", "uint64", account_id)?;
    let pnl = Column::<i64>::get("pnl", "int64", pnl)?;
    let amount = Column::<i64>::get("amount", "int64", amount)?;
    let (ids, accounts, pnls, amounts) = (
        position_id.slice(),
        account_id.slice(),
        pnl.slice(),
        amount.slice(),
    );
    if [ids.len(), pnls.len(), amounts.len()]
        .iter()
        .any(|&len| len != accounts.len())
    {
        return Err(ColumnLengthError::new_err(
            "allocation columns have unequal lengths",
        ));
    }
    if u32::try_from(accounts.len()).is_err() {
        return Err(PositionLimitError::new_err(
            "more than u32::MAX allocation rows",
        ));
    }
    let columns = py.detach(|| {
        let order = order::table_order(accounts);
        let rank: Vec<i64> = order.iter().map(|&row| i64::from(row)).collect();
        (
            order::gather(accounts, &order),
            order::gather(ids, &order),
            order::gather(pnls, &order),
            order::gather(amounts, &order),
            rank,
        )
    });
    let (accounts, ids, pnls, amounts, rank) = columns;
    PyTuple::new(
        py,
        [
            accounts.into_pyarray(py).into_any(),
            ids.into_pyarray(py).into_any(),
            pnls.into_pyarray(py).into_any(),
            amounts.into_pyarray(py).into_any(),
            rank.into_pyarray(py).into_any(),
        ],
    )
}

pub(crate) fn policy(insurance_share: &str, coverage_ratio: &str) -> PyResult<Policy> {
    Policy::parse(insurance_share, coverage_ratio).map_err(to_py)
}

/// The contract's ranking number: 1 (position) or 2 (account).
fn ranking_of(number: i64) -> PyResult<Ranking> {
    Ranking::from_number(number).ok_or_else(|| {
        AllocationError::new_err(format!(
            "ranking must be 1 (position) or 2 (account), got {number}"
        ))
    })
}

/// The result as (summary tuple, position_id, account_id, pnl, amount).
pub(crate) fn result_to_py<'py>(
    py: Python<'py>,
    allocation: Allocation,
) -> PyResult<Bound<'py, PyTuple>> {
    let s = allocation.summary;
    let summary = (
        s.fund_share,
        s.fund_paid,
        s.user_due,
        s.positions_total,
        s.profitable_count,
        s.profit_total,
        s.cutoff_pnl,
        s.participant_count,
        s.participant_profit,
        s.widened,
        s.allocated_total,
        s.uncovered,
    )
        .into_pyobject(py)?;
    let columns: [Bound<'py, PyAny>; 4] = [
        allocation.position_id.into_pyarray(py).into_any(),
        allocation.account_id.into_pyarray(py).into_any(),
        allocation.pnl.into_pyarray(py).into_any(),
        allocation.amount.into_pyarray(py).into_any(),
    ];
    let [position_id, account_id, pnl, amount] = columns;
    PyTuple::new(
        py,
        [summary.into_any(), position_id, account_id, pnl, amount],
    )
}

#[pyfunction]
#[pyo3(signature = (
    loss, fund_balance, insurance_share, coverage_ratio, position_id, account_id, pnl, ranking = 1
))]
#[allow(clippy::too_many_arguments)]
fn allocate<'py>(
    py: Python<'py>,
    loss: i64,
    fund_balance: i64,
    insurance_share: &str,
    coverage_ratio: &str,
    position_id: &Bound<'py, PyAny>,
    account_id: &Bound<'py, PyAny>,
    pnl: &Bound<'py, PyAny>,
    ranking: i64,
) -> PyResult<Bound<'py, PyTuple>> {
    let policy = policy(insurance_share, coverage_ratio)?;
    let ranking = ranking_of(ranking)?;
    let position_id = Column::<u64>::get("position_id", "uint64", position_id)?;
    let account_id = Column::<u64>::get("account_id", "uint64", account_id)?;
    let pnl = Column::<i64>::get("pnl", "int64", pnl)?;
    let positions = Positions {
        position_id: position_id.slice(),
        account_id: account_id.slice(),
        pnl: pnl.slice(),
    };
    let allocation = py.detach(|| allocate_ranked(loss, fund_balance, policy, ranking, positions));
    result_to_py(py, allocation.map_err(to_py)?)
}

/// The liquidations of a request straight from its bytes (see `liquidation`): a list of
/// `ledger.liquidation.LiquidationRequest` fields, or None unless every item is plainly
/// valid. `batch`: a RecordLiquidationsRequest, else one RecordLiquidationRequest.
#[pyfunction]
fn validated_liquidations<'py>(
    py: Python<'py>,
    message: &[u8],
    batch: bool,
) -> PyResult<Option<Vec<Bound<'py, PyTuple>>>> {
    let items = if batch {
        liquidation::batch(message)
    } else {
        liquidation::one(message).map(|item| vec![item])
    };
    items
        .map(|items| {
            items
                .iter()
                .map(|item| liquidation_to_py(py, item))
                .collect()
        })
        .transpose()
}

fn liquidation_to_py<'py>(py: Python<'py>, l: &Liquidation<'_>) -> PyResult<Bound<'py, PyTuple>> {
    let ratio = |e: &Exact| (e.numerator, 10u128.pow(e.places)).into_pyobject(py);
    let fields = [
        l.liquidation_id.into_pyobject(py)?.into_any(),
        l.cycle_id.into_pyobject(py)?.into_any(),
        l.symbol.into_pyobject(py)?.into_any(),
        l.account_id.into_pyobject(py)?.into_any(),
        l.position_id.into_pyobject(py)?.into_any(),
        l.side.into_pyobject(py)?.into_any(),
        ratio(&l.quantity)?.into_any(),
        ratio(&l.takeover_price)?.into_any(),
        ratio(&l.close_price)?.into_any(),
        l.remaining_margin.into_pyobject(py)?.into_any(),
        l.digest.as_str().into_pyobject(py)?.into_any(),
        l.quantity.canonical.as_str().into_pyobject(py)?.into_any(),
        l.takeover_price
            .canonical
            .as_str()
            .into_pyobject(py)?
            .into_any(),
        l.close_price
            .canonical
            .as_str()
            .into_pyobject(py)?
            .into_any(),
    ];
    PyTuple::new(py, fields)
}

/// The chain hashes of new entries of one currency (see `chain::entry_chain`); each entry is
/// (entry_id, kind, reference, debit, credit, amount).
#[pyfunction]
fn entry_chain(
    previous: &str,
    first_seq: u64,
    currency: &str,
    created_at_us: i64,
    entries: Vec<(u64, u8, String, String, String, i64)>,
) -> Vec<String> {
    let entries: Vec<NewEntry<'_>> = entries
        .iter()
        .map(
            |(entry_id, kind, reference, debit, credit, amount)| NewEntry {
                entry_id: *entry_id,
                kind: *kind,
                reference,
                debit,
                credit,
                amount: *amount,
            },
        )
        .collect();
    chain::entry_chain(previous, first_seq, currency, created_at_us, &entries)
}

#[pymodule]
fn _alloc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("POSITIONS_MAX", crate::POSITIONS_MAX)?;
    m.add_function(wrap_pyfunction!(allocate, m)?)?;
    m.add_function(wrap_pyfunction!(encode_allocation_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(table_order, m)?)?;
    m.add_function(wrap_pyfunction!(allocations_digest, m)?)?;
    m.add_function(wrap_pyfunction!(validated_liquidations, m)?)?;
    m.add_function(wrap_pyfunction!(entry_chain, m)?)?;
    m.add_class::<CycleInputDecoder>()?;
    m.add(
        "MalformedMessageError",
        py.get_type::<MalformedMessageError>(),
    )?;
    m.add("AllocationError", py.get_type::<AllocationError>())?;
    m.add("ColumnLengthError", py.get_type::<ColumnLengthError>())?;
    m.add("ColumnTypeError", py.get_type::<ColumnTypeError>())?;
    m.add(
        "DuplicatePositionError",
        py.get_type::<DuplicatePositionError>(),
    )?;
    m.add("NegativeAmountError", py.get_type::<NegativeAmountError>())?;
    m.add("RatioError", py.get_type::<RatioError>())?;
    m.add("AccountProfitError", py.get_type::<AccountProfitError>())?;
    m.add("PositionLimitError", py.get_type::<PositionLimitError>())?;
    m.add(
        "AllocationInvariantError",
        py.get_type::<AllocationInvariantError>(),
    )?;
    Ok(())
}
