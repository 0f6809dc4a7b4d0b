import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContractKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTRACT_KIND_UNSPECIFIED: _ClassVar[ContractKind]
    CONTRACT_KIND_LINEAR: _ClassVar[ContractKind]
    CONTRACT_KIND_INVERSE: _ClassVar[ContractKind]

class TransferDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_DIRECTION_UNSPECIFIED: _ClassVar[TransferDirection]
    TRANSFER_DIRECTION_DEPOSIT: _ClassVar[TransferDirection]
    TRANSFER_DIRECTION_WITHDRAW: _ClassVar[TransferDirection]

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    SIDE_LONG: _ClassVar[Side]
    SIDE_SHORT: _ClassVar[Side]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_FUND_INFLOW: _ClassVar[Outcome]
    OUTCOME_SYSTEM_LOSS: _ClassVar[Outcome]
    OUTCOME_BREAK_EVEN: _ClassVar[Outcome]

class EntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_KIND_UNSPECIFIED: _ClassVar[EntryKind]
    ENTRY_KIND_FUND_DEPOSIT: _ClassVar[EntryKind]
    ENTRY_KIND_FUND_WITHDRAWAL: _ClassVar[EntryKind]
    ENTRY_KIND_LIQUIDATION_PROFIT: _ClassVar[EntryKind]
    ENTRY_KIND_LIQUIDATION_LOSS: _ClassVar[EntryKind]
    ENTRY_KIND_INSURANCE_COVER: _ClassVar[EntryKind]
    ENTRY_KIND_ALLOCATION: _ClassVar[EntryKind]
    ENTRY_KIND_UNCOVERED_LOSS: _ClassVar[EntryKind]

class CycleState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CYCLE_STATE_UNSPECIFIED: _ClassVar[CycleState]
    CYCLE_STATE_PREVIEW: _ClassVar[CycleState]
    CYCLE_STATE_CLOSED: _ClassVar[CycleState]
    CYCLE_STATE_REVERSED: _ClassVar[CycleState]

class Ranking(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANKING_UNSPECIFIED: _ClassVar[Ranking]
    RANKING_POSITION: _ClassVar[Ranking]
    RANKING_ACCOUNT: _ClassVar[Ranking]
CONTRACT_KIND_UNSPECIFIED: ContractKind
CONTRACT_KIND_LINEAR: ContractKind
CONTRACT_KIND_INVERSE: ContractKind
TRANSFER_DIRECTION_UNSPECIFIED: TransferDirection
TRANSFER_DIRECTION_DEPOSIT: TransferDirection
TRANSFER_DIRECTION_WITHDRAW: TransferDirection
SIDE_UNSPECIFIED: Side
SIDE_LONG: Side
SIDE_SHORT: Side
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_FUND_INFLOW: Outcome
OUTCOME_SYSTEM_LOSS: Outcome
OUTCOME_BREAK_EVEN: Outcome
ENTRY_KIND_UNSPECIFIED: EntryKind
ENTRY_KIND_FUND_DEPOSIT: EntryKind
ENTRY_KIND_FUND_WITHDRAWAL: EntryKind
ENTRY_KIND_LIQUIDATION_PROFIT: EntryKind
ENTRY_KIND_LIQUIDATION_LOSS: EntryKind
ENTRY_KIND_INSURANCE_COVER: EntryKind
ENTRY_KIND_ALLOCATION: EntryKind
ENTRY_KIND_UNCOVERED_LOSS: EntryKind
CYCLE_STATE_UNSPECIFIED: CycleState
CYCLE_STATE_PREVIEW: CycleState
CYCLE_STATE_CLOSED: CycleState
CYCLE_STATE_REVERSED: CycleState
RANKING_UNSPECIFIED: Ranking
RANKING_POSITION: Ranking
RANKING_ACCOUNT: Ranking

class Currency(_message.Message):
    __slots__ = ("code", "scale")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    code: str
    scale: int
    def __init__(self, code: _Optional[str] = ..., scale: _Optional[int] = ...) -> None: ...

class Contract(_message.Message):
    __slots__ = ("symbol", "margin_currency", "kind", "multiplier")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    MARGIN_CURRENCY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    margin_currency: str
    kind: ContractKind
    multiplier: str
    def __init__(self, symbol: _Optional[str] = ..., margin_currency: _Optional[str] = ..., kind: _Optional[_Union[ContractKind, str]] = ..., multiplier: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("currency", "insurance_share", "coverage_ratio", "version", "ranking")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    INSURANCE_SHARE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    currency: str
    insurance_share: str
    coverage_ratio: str
    version: int
    ranking: Ranking
    def __init__(self, currency: _Optional[str] = ..., insurance_share: _Optional[str] = ..., coverage_ratio: _Optional[str] = ..., version: _Optional[int] = ..., ranking: _Optional[_Union[Ranking, str]] = ...) -> None: ...

class Posting(_message.Message):
    __slots__ = ("account", "amount")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    amount: int
    def __init__(self, account: _Optional[str] = ..., amount: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("entry_id", "kind", "currency", "reference", "postings", "created_at", "memo", "position_id", "pnl", "reverses")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    POSTINGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMO_FIELD_NUMBER: _ClassVar[int]
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    PNL_FIELD_NUMBER: _ClassVar[int]
    REVERSES_FIELD_NUMBER: _ClassVar[int]
    entry_id: int
    kind: EntryKind
    currency: str
    reference: str
    postings: _containers.RepeatedCompositeFieldContainer[Posting]
    created_at: _timestamp_pb2.Timestamp
    memo: str
    position_id: int
    pnl: int
    reverses: int
    def __init__(self, entry_id: _Optional[int] = ..., kind: _Optional[_Union[EntryKind, str]] = ..., currency: _Optional[str] = ..., reference: _Optional[str] = ..., postings: _Optional[_Iterable[_Union[Posting, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., memo: _Optional[str] = ..., position_id: _Optional[int] = ..., pnl: _Optional[int] = ..., reverses: _Optional[int] = ...) -> None: ...

class Fund(_message.Message):
    __slots__ = ("currency", "balance", "inflow_total", "outflow_total")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    INFLOW_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OUTFLOW_TOTAL_FIELD_NUMBER: _ClassVar[int]
    currency: str
    balance: int
    inflow_total: int
    outflow_total: int
    def __init__(self, currency: _Optional[str] = ..., balance: _Optional[int] = ..., inflow_total: _Optional[int] = ..., outflow_total: _Optional[int] = ...) -> None: ...

class LiquidationResult(_message.Message):
    __slots__ = ("liquidation_id", "currency", "engine_result", "outcome", "fund_balance", "entry_id")
    LIQUIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RESULT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FUND_BALANCE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    liquidation_id: str
    currency: str
    engine_result: int
    outcome: Outcome
    fund_balance: int
    entry_id: int
    def __init__(self, liquidation_id: _Optional[str] = ..., currency: _Optional[str] = ..., engine_result: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., fund_balance: _Optional[int] = ..., entry_id: _Optional[int] = ...) -> None: ...

class CycleHeader(_message.Message):
    __slots__ = ("cycle_id", "currency")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ...) -> None: ...

class PositionChunk(_message.Message):
    __slots__ = ("position_id", "account_id", "pnl")
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PNL_FIELD_NUMBER: _ClassVar[int]
    position_id: _containers.RepeatedScalarFieldContainer[int]
    account_id: _containers.RepeatedScalarFieldContainer[int]
    pnl: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, position_id: _Optional[_Iterable[int]] = ..., account_id: _Optional[_Iterable[int]] = ..., pnl: _Optional[_Iterable[int]] = ...) -> None: ...

class CycleInput(_message.Message):
    __slots__ = ("header", "positions")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    header: CycleHeader
    positions: PositionChunk
    def __init__(self, header: _Optional[_Union[CycleHeader, _Mapping]] = ..., positions: _Optional[_Union[PositionChunk, _Mapping]] = ...) -> None: ...

class CycleSummary(_message.Message):
    __slots__ = ("cycle_id", "currency", "state", "loss_total", "fund_balance_before", "fund_share", "fund_paid", "user_due", "allocated_total", "uncovered", "positions_total", "profitable_count", "profit_total", "participant_count", "participant_profit", "cutoff_pnl", "widened", "input_digest", "insurance_share", "coverage_ratio", "closed_at", "version", "allocation_rate", "ranking")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FUND_BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FUND_SHARE_FIELD_NUMBER: _ClassVar[int]
    FUND_PAID_FIELD_NUMBER: _ClassVar[int]
    USER_DUE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNCOVERED_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROFITABLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROFIT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_PROFIT_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_PNL_FIELD_NUMBER: _ClassVar[int]
    WIDENED_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INSURANCE_SHARE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_RATE_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    state: CycleState
    loss_total: int
    fund_balance_before: int
    fund_share: int
    fund_paid: int
    user_due: int
    allocated_total: int
    uncovered: int
    positions_total: int
    profitable_count: int
    profit_total: int
    participant_count: int
    participant_profit: int
    cutoff_pnl: int
    widened: bool
    input_digest: str
    insurance_share: str
    coverage_ratio: str
    closed_at: _timestamp_pb2.Timestamp
    version: int
    allocation_rate: str
    ranking: Ranking
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., state: _Optional[_Union[CycleState, str]] = ..., loss_total: _Optional[int] = ..., fund_balance_before: _Optional[int] = ..., fund_share: _Optional[int] = ..., fund_paid: _Optional[int] = ..., user_due: _Optional[int] = ..., allocated_total: _Optional[int] = ..., uncovered: _Optional[int] = ..., positions_total: _Optional[int] = ..., profitable_count: _Optional[int] = ..., profit_total: _Optional[int] = ..., participant_count: _Optional[int] = ..., participant_profit: _Optional[int] = ..., cutoff_pnl: _Optional[int] = ..., widened: _Optional[bool] = ..., input_digest: _Optional[str] = ..., insurance_share: _Optional[str] = ..., coverage_ratio: _Optional[str] = ..., closed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ..., allocation_rate: _Optional[str] = ..., ranking: _Optional[_Union[Ranking, str]] = ...) -> None: ...

class AllocationChunk(_message.Message):
    __slots__ = ("position_id", "account_id", "pnl", "amount")
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PNL_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    position_id: _containers.RepeatedScalarFieldContainer[int]
    account_id: _containers.RepeatedScalarFieldContainer[int]
    pnl: _containers.RepeatedScalarFieldContainer[int]
    amount: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, position_id: _Optional[_Iterable[int]] = ..., account_id: _Optional[_Iterable[int]] = ..., pnl: _Optional[_Iterable[int]] = ..., amount: _Optional[_Iterable[int]] = ...) -> None: ...

class VerifyReport(_message.Message):
    __slots__ = ("ok", "entries_checked", "problems")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries_checked: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., entries_checked: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateCurrencyRequest(_message.Message):
    __slots__ = ("code", "scale")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    code: str
    scale: int
    def __init__(self, code: _Optional[str] = ..., scale: _Optional[int] = ...) -> None: ...

class ListCurrenciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCurrenciesResponse(_message.Message):
    __slots__ = ("currencies",)
    CURRENCIES_FIELD_NUMBER: _ClassVar[int]
    currencies: _containers.RepeatedCompositeFieldContainer[Currency]
    def __init__(self, currencies: _Optional[_Iterable[_Union[Currency, _Mapping]]] = ...) -> None: ...

class UpsertContractRequest(_message.Message):
    __slots__ = ("symbol", "margin_currency", "kind", "multiplier")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    MARGIN_CURRENCY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    margin_currency: str
    kind: ContractKind
    multiplier: str
    def __init__(self, symbol: _Optional[str] = ..., margin_currency: _Optional[str] = ..., kind: _Optional[_Union[ContractKind, str]] = ..., multiplier: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("currency", "insurance_share", "coverage_ratio", "ranking")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    INSURANCE_SHARE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    currency: str
    insurance_share: str
    coverage_ratio: str
    ranking: Ranking
    def __init__(self, currency: _Optional[str] = ..., insurance_share: _Optional[str] = ..., coverage_ratio: _Optional[str] = ..., ranking: _Optional[_Union[Ranking, str]] = ...) -> None: ...

class TransferFundRequest(_message.Message):
    __slots__ = ("transfer_id", "currency", "direction", "amount", "memo")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MEMO_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    currency: str
    direction: TransferDirection
    amount: int
    memo: str
    def __init__(self, transfer_id: _Optional[str] = ..., currency: _Optional[str] = ..., direction: _Optional[_Union[TransferDirection, str]] = ..., amount: _Optional[int] = ..., memo: _Optional[str] = ...) -> None: ...

class RecordLiquidationRequest(_message.Message):
    __slots__ = ("liquidation_id", "cycle_id", "symbol", "account_id", "position_id", "side", "quantity", "takeover_price", "close_price", "remaining_margin")
    LIQUIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    TAKEOVER_PRICE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_PRICE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MARGIN_FIELD_NUMBER: _ClassVar[int]
    liquidation_id: str
    cycle_id: str
    symbol: str
    account_id: int
    position_id: int
    side: Side
    quantity: str
    takeover_price: str
    close_price: str
    remaining_margin: int
    def __init__(self, liquidation_id: _Optional[str] = ..., cycle_id: _Optional[str] = ..., symbol: _Optional[str] = ..., account_id: _Optional[int] = ..., position_id: _Optional[int] = ..., side: _Optional[_Union[Side, str]] = ..., quantity: _Optional[str] = ..., takeover_price: _Optional[str] = ..., close_price: _Optional[str] = ..., remaining_margin: _Optional[int] = ...) -> None: ...

class RecordLiquidationsRequest(_message.Message):
    __slots__ = ("liquidations",)
    LIQUIDATIONS_FIELD_NUMBER: _ClassVar[int]
    liquidations: _containers.RepeatedCompositeFieldContainer[RecordLiquidationRequest]
    def __init__(self, liquidations: _Optional[_Iterable[_Union[RecordLiquidationRequest, _Mapping]]] = ...) -> None: ...

class RecordLiquidationsResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[LiquidationOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[LiquidationOutcome, _Mapping]]] = ...) -> None: ...

class LiquidationOutcome(_message.Message):
    __slots__ = ("code", "message", "result")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    result: LiquidationResult
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., result: _Optional[_Union[LiquidationResult, _Mapping]] = ...) -> None: ...

class GetFundRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class GetCycleRequest(_message.Message):
    __slots__ = ("cycle_id", "currency", "version")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    version: int
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class StreamAllocationsRequest(_message.Message):
    __slots__ = ("cycle_id", "currency", "account_id")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    account_id: int
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., account_id: _Optional[int] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("currency", "account", "kind", "page_size", "page_token")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    currency: str
    account: str
    kind: EntryKind
    page_size: int
    page_token: str
    def __init__(self, currency: _Optional[str] = ..., account: _Optional[str] = ..., kind: _Optional[_Union[EntryKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VerifyLedgerRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class ReverseLiquidationRequest(_message.Message):
    __slots__ = ("liquidation_id", "reason")
    LIQUIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    liquidation_id: str
    reason: str
    def __init__(self, liquidation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReverseCycleRequest(_message.Message):
    __slots__ = ("cycle_id", "currency", "reason")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    reason: str
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListCyclesRequest(_message.Message):
    __slots__ = ("currency", "page_size", "page_token")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    currency: str
    page_size: int
    page_token: str
    def __init__(self, currency: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCyclesResponse(_message.Message):
    __slots__ = ("cycles", "next_page_token")
    CYCLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cycles: _containers.RepeatedCompositeFieldContainer[CycleSummary]
    next_page_token: str
    def __init__(self, cycles: _Optional[_Iterable[_Union[CycleSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    def __init__(self, policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ...) -> None: ...

class ListContractsRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class ListContractsResponse(_message.Message):
    __slots__ = ("contracts",)
    CONTRACTS_FIELD_NUMBER: _ClassVar[int]
    contracts: _containers.RepeatedCompositeFieldContainer[Contract]
    def __init__(self, contracts: _Optional[_Iterable[_Union[Contract, _Mapping]]] = ...) -> None: ...

class GetLiquidationRequest(_message.Message):
    __slots__ = ("liquidation_id",)
    LIQUIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    liquidation_id: str
    def __init__(self, liquidation_id: _Optional[str] = ...) -> None: ...

class Liquidation(_message.Message):
    __slots__ = ("request", "result", "recorded_at", "reversed")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    REVERSED_FIELD_NUMBER: _ClassVar[int]
    request: RecordLiquidationRequest
    result: LiquidationResult
    recorded_at: _timestamp_pb2.Timestamp
    reversed: bool
    def __init__(self, request: _Optional[_Union[RecordLiquidationRequest, _Mapping]] = ..., result: _Optional[_Union[LiquidationResult, _Mapping]] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reversed: _Optional[bool] = ...) -> None: ...

class ListOpenCyclesRequest(_message.Message):
    __slots__ = ("currency",)
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    currency: str
    def __init__(self, currency: _Optional[str] = ...) -> None: ...

class OpenCycle(_message.Message):
    __slots__ = ("cycle_id", "currency", "loss_total", "liquidations_count", "first_recorded_at", "last_recorded_at")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LOSS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LIQUIDATIONS_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    loss_total: int
    liquidations_count: int
    first_recorded_at: _timestamp_pb2.Timestamp
    last_recorded_at: _timestamp_pb2.Timestamp
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., loss_total: _Optional[int] = ..., liquidations_count: _Optional[int] = ..., first_recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListOpenCyclesResponse(_message.Message):
    __slots__ = ("cycles",)
    CYCLES_FIELD_NUMBER: _ClassVar[int]
    cycles: _containers.RepeatedCompositeFieldContainer[OpenCycle]
    def __init__(self, cycles: _Optional[_Iterable[_Union[OpenCycle, _Mapping]]] = ...) -> None: ...

class ExplainAllocationRequest(_message.Message):
    __slots__ = ("cycle_id", "currency", "position_id")
    CYCLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    cycle_id: str
    currency: str
    position_id: int
    def __init__(self, cycle_id: _Optional[str] = ..., currency: _Optional[str] = ..., position_id: _Optional[int] = ...) -> None: ...

class AllocationExplanation(_message.Message):
    __slots__ = ("position_id", "account_id", "pnl", "rank", "profitable_count", "cutoff_pnl", "participant", "participant_profit", "allocated_total", "share_numerator", "share_denominator", "amount", "remainder_unit")
    POSITION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PNL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PROFITABLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_PNL_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_PROFIT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHARE_NUMERATOR_FIELD_NUMBER: _ClassVar[int]
    SHARE_DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REMAINDER_UNIT_FIELD_NUMBER: _ClassVar[int]
    position_id: int
    account_id: int
    pnl: int
    rank: int
    profitable_count: int
    cutoff_pnl: int
    participant: bool
    participant_profit: int
    allocated_total: int
    share_numerator: str
    share_denominator: str
    amount: int
    remainder_unit: bool
    def __init__(self, position_id: _Optional[int] = ..., account_id: _Optional[int] = ..., pnl: _Optional[int] = ..., rank: _Optional[int] = ..., profitable_count: _Optional[int] = ..., cutoff_pnl: _Optional[int] = ..., participant: _Optional[bool] = ..., participant_profit: _Optional[int] = ..., allocated_total: _Optional[int] = ..., share_numerator: _Optional[str] = ..., share_denominator: _Optional[str] = ..., amount: _Optional[int] = ..., remainder_unit: _Optional[bool] = ...) -> None: ...
