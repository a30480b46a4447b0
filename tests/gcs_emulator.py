"""A local GCS JSON-API server for the tests: PyPI's `gcp-storage-emulator`, plus the object
generations that real GCS has and TensorStore (Orbax's array writer) relies on.

  python tests/gcs_emulator.py BUCKET   serves on 127.0.0.1 (a free port), in memory, with
                                        BUCKET created; prints `port N` once it listens

`gcp-storage-emulator` ignores generation preconditions and sends no `x-goog-generation`
header with an object's bytes. TensorStore reads an object's generation from that header,
re-reads with `ifGenerationNotMatch` (expecting 304 when unchanged) and writes with
`ifGenerationMatch` (0: only if absent; expecting 412 otherwise): OCDBT's manifest update
fails ("Malformed StorageGeneration") without them. `add_generations` adds them to the
emulator's object handlers, as the GCS JSON API documents them.

Two changes for speed, none to behaviour: the emulator rewrites one JSON file of every
object's metadata after each write (for restarts; quadratic in the object count, 0.1 s a
write after a few hundred objects): off, the server is in memory and lives for one test
module. And its listen backlog is 128, not 5: a client uploading 16 files at a time had its
connections dropped and retried after a second each.
"""

import http
import logging
import socketserver
import sys
import time

from gcp_storage_emulator import exceptions
from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int:
  """The live object's generation; 0 if there is none (GCS's `ifGenerationMatch=0`)."""
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except exceptions.NotFound:
    return 0


def _precondition_failed(request, generation: int, *, read: bool) -> http.HTTPStatus | None:
  """The status GCS answers for the request's generation preconditions, or None (go on)."""
  query = request.query
  if 'ifGenerationMatch' in query and int(query['ifGenerationMatch'][0]) != generation:
    return http.HTTPStatus.PRECONDITION_FAILED
  if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch'][0]) == generation:
    return http.HTTPStatus.NOT_MODIFIED if read else http.HTTPStatus.PRECONDITION_FAILED
  return None


def add_generations() -> None:
  """Patches the emulator's object handlers (before its server module builds its routes)."""
  download, insert, delete = objects.download, objects.insert, objects.delete

  def download_with_generation(request, response, storage, *args, **kwargs):
    bucket, name = request.params['bucket_name'], request.params['object_id']
    generation = _generation(storage, bucket, name)
    status = _precondition_failed(request, generation, read=True) if generation else None
    if status is not None:
      response.status = status
      if generation:
        response['x-goog-generation'] = str(generation)
      return None
    if generation:
      obj = storage.get_file_obj(bucket, name)
      response['x-goog-generation'] = str(generation)
      response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
      response['x-goog-stored-content-length'] = str(obj.get('size', 0))
    return download(request, response, storage, *args, **kwargs)

  def insert_if_generation(request, response, storage, *args, **kwargs):
    name = request.query.get('name', [None])[0]
    if name is None and isinstance(request.data, dict):  # multipart: the name is in 'meta'
      name = (request.data.get('meta') or {}).get('name')
    if name is not None:
      status = _precondition_failed(
          request, _generation(storage, request.params['bucket_name'], name), read=False)
      if status is not None:
        response.status = status
        return None
    return insert(request, response, storage, *args, **kwargs)

  def delete_if_generation(request, response, storage, *args, **kwargs):
    generation = _generation(storage, request.params['bucket_name'],
                             request.params['object_id'])
    status = _precondition_failed(request, generation, read=False)
    if status is not None:
      response.status = status
      return None
    return delete(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation
  objects.insert = insert_if_generation
  objects.delete = delete_if_generation


def main(bucket: str) -> None:
  logging.basicConfig(level=logging.WARNING)
  add_generations()
  # pylint: disable-next=protected-access
  emulator_storage.Storage._write_config_to_file = lambda self: None
  socketserver.TCPServer.request_queue_size = 128
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  emulator = server.create_server('127.0.0.1', 0, in_memory=True, default_bucket=bucket)
  emulator.start()
  port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  print(f'port {port}', flush=True)
  while True:  # until the test stops the process
    time.sleep(3600)


if __name__ == '__main__':
  main(sys.argv[1])
