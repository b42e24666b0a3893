// Declarations shared by every kernel family besides the host contract: the masked-score
// sentinel. The contract itself (`struct Params`, the POS_* and BRANCH_* codes, NO_SINK_LOGITS
// and every binding) is generated from src/kernel/abi.rs and prepended by the host.

// Finite stand-in for −∞: WGSL lets implementations assume there are no infinities.
const MASKED: f32 = -1.0e30;
