"""Operations on ModelFiles; each works tensor by tensor."""
