from sglang.srt.disaggregation.base.conn import (BaseKVBootstrapServer, BaseKVManager, BaseKVReceiver, BaseKVSender,
                                                 KVArgs, KVPoll, KVTransferMetric)

__all__ = ["BaseKVBootstrapServer", "BaseKVManager", "BaseKVReceiver", "BaseKVSender", "KVArgs", "KVPoll",
           "KVTransferMetric"]
