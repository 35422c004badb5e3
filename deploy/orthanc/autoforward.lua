-- Auto-forward every CR and DX instance Orthanc stores to fracnode, as soon as it arrives.
-- The node assembles studies itself (a quiet window after the last instance), so forwarding
-- instance by instance costs no accuracy and the first result comes sooner than waiting for
-- Orthanc's "stable study" event.
--
-- The node's own results (SR, SC, GSPS: modalities SR / OT / PR) are never forwarded, and
-- nothing that came from the node's AE title goes back to it, so results cannot loop.

local FORWARDED_MODALITIES = { CR = true, DX = true }
local NODE = 'fracnode'          -- the DicomModalities entry in orthanc.json
local NODE_AET = 'FRACNODE'

function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
      return
   end
   if FORWARDED_MODALITIES[tags['Modality']] then
      SendToModality(instanceId, NODE)
   end
end
