"""The integrations, in one folder: provider SDK instrumentation (:func:`llmtally.instrument`),
LangChain (``llmtally.langchain``), LiteLLM (``llmtally.litellm``) and OpenTelemetry
(``llmtally.otel``), sharing the call API of :class:`llmtally.LLMCall`, one registry of open runs
and one failure guard (``_runs``). Each is imported only when used: the core needs none of their
libraries."""
