-- Argo CD health check for DelegationGrant (delegation.nhi.dev/v1alpha1), from delegation-operator.
-- Install it as argocd-cm key resource.customizations.health.delegation.nhi.dev_DelegationGrant
-- (examples/gitops/argocd/argocd-cm.yaml); it needs only Lua's base library. Mapping of the Ready
-- condition the operator writes (docs/gitops.md):
--   Healthy      Ready=True for the current generation: a valid token is in the grant's Secret
--   Progressing  no status or no Ready condition yet; the status is for an older generation; being
--                deleted; Ready=Unknown; waiting for something that comes by itself or from a person:
--                ApprovalPending, ParentNotReady, ParentUpdating, AgentMissing
--   Suspended    the grant (Suspended) or its agent (AgentSuspended) is suspended
--   Degraded     refused until someone changes something: every Denied* reason, ApprovalRejected,
--                Expired, SecretConflict, Revoked, and any reason this check does not know
local waiting = {ApprovalPending = true, ParentNotReady = true, ParentUpdating = true, AgentMissing = true}
local suspended = {Suspended = true, AgentSuspended = true}

local function explain(condition)
  local reason = condition.reason
  if reason == nil or reason == "" then
    reason = "Ready=" .. tostring(condition.status)
  end
  if condition.message ~= nil and condition.message ~= "" then
    return reason .. ": " .. condition.message
  end
  return reason
end

if obj.metadata.deletionTimestamp ~= nil then
  return {status = "Progressing", message = "Being deleted: the operator revokes its tokens, then removes its finalizer"}
end
local status = obj.status
if status == nil then
  return {status = "Progressing", message = "Waiting for the operator: no status yet"}
end
local ready = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready == nil then
  return {status = "Progressing", message = "Waiting for the operator: no Ready condition yet"}
end
local generation = obj.metadata.generation
local observed = status.observedGeneration
if observed == nil then
  observed = ready.observedGeneration
end
if generation ~= nil and observed ~= nil and observed ~= generation then
  return {status = "Progressing", message = "Waiting for the operator to observe generation " .. generation .. " (the status is for generation " .. observed .. ")"}
end
if ready.status == "True" then
  return {status = "Healthy", message = explain(ready)}
end
if ready.status == "False" then
  if suspended[ready.reason] then
    return {status = "Suspended", message = explain(ready)}
  end
  if waiting[ready.reason] then
    return {status = "Progressing", message = explain(ready)}
  end
  return {status = "Degraded", message = explain(ready)}
end
return {status = "Progressing", message = explain(ready)}
